/**
 * The plugin API against nbdkit's: a TypeScript plugin and nbdkit's `eval`
 * plugin given the same callbacks must show a client the same export.
 * nbdkit derives an export's flags from which callbacks a plugin has and
 * what its `can_*` callbacks say; ours must derive the same ones.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { captive, requireTool, ROOT, sh, shQuote, withScratch } from "./helpers.ts";

/** One callback, as our plugin and as an `eval` script say it. */
type Callback = readonly [ours: string, theirs: string];

const CALLBACKS: Record<string, Callback> = {
  pwrite: ["pwrite: () => {}", "pwrite=cat >/dev/null"],
  flush: ["flush: () => {}", "flush=true"],
  trim: ["trim: () => {}", "trim=true"],
  zero: ["zero: () => {}", "zero=true"],
  cache: ["cache: () => {}", "cache=true"],
  extents: [
    "extents: (_h, count, offset, _f, sink) => sink.add(offset, count, 0)",
    "extents=echo $4 $3 0",
  ],
  "not writable": ["canWrite: () => false", "can_write=exit 3"],
  rotational: ["isRotational: () => true", "is_rotational=exit 0"],
  "multi-conn": ["canMultiConn: () => true", "can_multi_conn=exit 0"],
  "no flush": ["canFlush: () => false", "can_flush=exit 3"],
  "no trim": ["canTrim: () => false", "can_trim=exit 3"],
  "no zero": ["canZero: () => false", "can_zero=exit 3"],
  "fast zero": ["canFastZero: () => true", "can_fast_zero=exit 0"],
  "fua native": ['canFua: () => "native"', "can_fua=echo native"],
  "fua none": ['canFua: () => "none"', "can_fua=echo none"],
  "cache none": ['canCache: () => "none"', "can_cache=echo none"],
  "cache emulate": ['canCache: () => "emulate"', "can_cache=echo emulate"],
  "no extents": ["canExtents: () => false", "can_extents=exit 3"],
};

/** The sets of callbacks compared, from a bare read-only plugin up. */
const CASES: string[][] = [
  [],
  ["pwrite"],
  ["pwrite", "flush", "trim", "zero"],
  ["pwrite", "flush", "trim", "zero", "fua native", "fast zero", "multi-conn", "rotational"],
  ["pwrite", "flush", "trim", "zero", "no flush", "no trim", "no zero", "fua none"],
  ["pwrite", "flush", "trim", "zero", "not writable"],
  ["pwrite", "fast zero"],
  ["pwrite", "flush"],
  ["pwrite", "zero"],
  ["pwrite", "zero", "no zero"],
  ["pwrite", "flush", "fua none", "multi-conn"],
  ["cache", "extents", "rotational", "multi-conn"],
  ["cache", "cache none"],
  ["cache emulate"],
  ["extents", "no extents"],
];

const LISTING = 'nbdinfo --json --can base:allocation "$uri"; echo "allocation=$?"; ' +
  'nbdinfo --json "$uri"';

/** What a client sees of the export: every flag nbdinfo reports, and base:allocation. */
function seen(stdout: string): Record<string, unknown> {
  const [allocation, json] = stdout.split(/^allocation=(\d+)\n/m).slice(1);
  const [exp] = JSON.parse(json).exports as Record<string, unknown>[];
  const flags = Object.entries(exp).filter(([k]) => /^(is_|can_)/.test(k));
  return { ...Object.fromEntries(flags), "base:allocation": allocation === "0" };
}

/**
 * A 1 MiB RAM disk of 0xaa bytes, written as plugin `name` in `dir` with
 * these extra callbacks (source text): the tests of how zeroes are emulated.
 */
function ramDisk(dir: string, name: string, callbacks: string): string {
  const file = join(dir, `${name}.ts`);
  writeFileSync(
    file,
    `import { definePlugin, NbdError } from ${JSON.stringify(join(ROOT, "mod.ts"))};
const disk = new Uint8Array(1 << 20).fill(0xaa);
export default definePlugin({
  name: "${name}",
  open: () => null,
  getSize: () => disk.length,
  pread: (_h, buf, offset) => void buf.set(disk.subarray(offset, offset + buf.length)),
  pwrite: (_h, buf, offset) => void disk.set(buf, offset),
  ${callbacks}
});
`,
  );
  return file;
}

test("canZero false: zeroes are written with pwrite, never given to zero, as nbdkit does", async () => {
  await withScratch(async (dir) => {
    const file = ramDisk(
      dir,
      "nozero",
      'zero: () => { throw new NbdError("EIO", "zero must not be called"); },\n  canZero: () => false,',
    );
    const py = "h.zero(8192, 4096); b = h.pread(16384, 0); " +
      "print(b[:4096].count(0xaa), b[4096:12288].count(0), b[12288:].count(0xaa))";
    const r = await captive([file], `nbdsh -u "$uri" -c ${shQuote(py)}`);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "4096 8192 4096");
    assert.doesNotMatch(r.stderr, /must not be called/);
  });
});

test("a zero refused with ENOTSUP or a system error's EOPNOTSUPP is written with pwrite, as nbdkit's", async () => {
  await withScratch(async (dir) => {
    for (
      const refusal of [
        'new NbdError("ENOTSUP", "no")',
        'Object.assign(new Error("no"), { code: "EOPNOTSUPP" })',
      ]
    ) {
      const file = ramDisk(dir, "refusing", `zero: () => { throw ${refusal}; },`);
      const py = "h.zero(8192, 4096); print(h.pread(16384, 0).count(0))";
      const r = await captive([file], `nbdsh -u "$uri" -c ${shQuote(py)}`);
      assert.equal(r.status, 0, `${refusal}: ${r.stderr}`);
      assert.equal(r.stdout, "8192\n", refusal);
    }
  });
});

test("the export's flags follow from the callbacks as nbdkit's do", async () => {
  requireTool("nbdkit");
  await withScratch(async (dir) => {
    for (const [i, names] of CASES.entries()) {
      const ours = names.map((n) => CALLBACKS[n][0]);
      const theirs = names.map((n) => CALLBACKS[n][1]);
      const file = join(dir, `case${i}.ts`);
      writeFileSync(
        file,
        `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
export default definePlugin({
  name: "flags",
  open: () => null,
  getSize: () => 1 << 20,
  pread: (_h, buf) => void buf.fill(0),
  ${ours.join(",\n  ")}
});
`,
      );
      const mine = await captive([file], LISTING);
      assert.equal(mine.status, 0, mine.stderr);
      const peer = sh(
        `nbdkit -U - eval get_size='echo 1048576' pread='head -c $3 /dev/zero' ` +
          `${theirs.map(shQuote).join(" ")} --run ${shQuote(LISTING)}`,
      );
      assert.equal(peer.status, 0, peer.stderr);
      assert.deepEqual(seen(mine.stdout), seen(peer.stdout), `callbacks: ${names.join(", ")}`);
    }
  });
});

test("errors a plugin throws reach the client as nbdkit's do", async () => {
  requireTool("nbdkit");
  // Each request fails with the errno named in the environment; the client
  // prints the errno it got for a plain read, an unfragmented read, a
  // write and a fast zero.
  const py = `import errno
def got(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        return errno.errorcode.get(e.errnum)
print(got(lambda: h.pread(512, 0)), got(lambda: h.pread_structured(512, 0, lambda *a: 0, nbd.CMD_FLAG_DF)),
      got(lambda: h.pwrite(b"x" * 512, 0)), got(lambda: h.zero(512, 0, nbd.CMD_FLAG_FAST_ZERO)))`;
  const script = `nbdsh -u "$uri" -c ${shQuote(py)}`;
  await withScratch(async (dir) => {
    const file = join(dir, "failing.ts");
    // NbdError for NBD's own errnos; a system error's code for the others,
    // as a plugin that lets a failed write's error through would throw it.
    writeFileSync(
      file,
      `import { definePlugin, NbdError } from ${JSON.stringify(join(ROOT, "mod.ts"))};
const NBD = ["EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN"];
let name = "EIO";
const fail = () => {
  // deno-lint-ignore no-explicit-any
  if (NBD.includes(name)) throw new NbdError(name as any, "failed on purpose");
  throw Object.assign(new Error("failed on purpose"), { code: name });
};
export default definePlugin({
  name: "failing",
  config: (_key, value) => { name = value; },
  open: () => null,
  getSize: () => 1 << 20,
  pread: fail,
  pwrite: fail,
  zero: fail,
  canFastZero: () => true,
});
`,
    );
    // nbdkit's pwrite script reads the data first: one that exits before
    // nbdkit has written it makes nbdkit's write into its stdin fail (EPIPE),
    // and the client gets EIO whatever the script said, more often on a
    // loaded machine.
    const fails = (name: string, data = false) =>
      `${data ? "cat >/dev/null; " : ""}echo ${name} failed on purpose >&2; exit 1`;
    for (
      const name of [
        "EPERM",
        "EIO",
        "ENOMEM",
        "EINVAL",
        "ENOSPC",
        "EOVERFLOW",
        "ENOTSUP",
        "ESHUTDOWN",
        "EROFS",
        "EDQUOT",
        "EFBIG",
        "EOPNOTSUPP",
      ]
    ) {
      const mine = await captive([file, `errno=${name}`], script);
      assert.equal(mine.status, 0, mine.stderr);
      const peer = sh(
        `nbdkit -U - eval get_size='echo 1048576' ${
          ["pread", "pwrite", "zero"].map((m) => `${m}=${shQuote(fails(name, m === "pwrite"))}`)
            .join(" ")
        } can_fast_zero='exit 0' --run ${shQuote(script)}`,
      );
      assert.equal(peer.status, 0, peer.stderr);
      assert.equal(mine.stdout, peer.stdout, name);
    }
  });
});

test("listExports, descriptions and defaultExport: nbdinfo sees nbdkit's list", async () => {
  requireTool("nbdkit");
  await withScratch(async (dir) => {
    const file = join(dir, "listing.ts");
    writeFileSync(
      file,
      `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
export default definePlugin({
  name: "listing",
  listExports: () => [{ name: "a", description: "first" }, { name: "b" }],
  defaultExport: () => "b",
  open: ({ exportName }) => exportName,
  getSize: (name) => name === "a" ? 1 << 20 : 1 << 21,
  pread: (_h, buf) => void buf.fill(0),
});
`,
    );
    // Without the URIs, which name each server's own socket.
    const script = 'nbdinfo --list --json "$uri" | grep -v "\\"uri\\""; ' +
      'nbdinfo --json "$uri" | grep -E "export-(name|size)\\""';
    const mine = await captive([file], script);
    assert.equal(mine.status, 0, mine.stderr);
    const peer = sh(
      `nbdkit -U - eval list_exports=${shQuote('printf "INTERLEAVED\\na\\nfirst\\nb\\n\\n"')} ` +
        `default_export='echo b' get_size=${
          shQuote('if [ "$(cat $tmpdir/name)" = a ]; then echo 1048576; else echo 2097152; fi')
        } open=${shQuote('echo -n "$3" > $tmpdir/name')} pread='head -c $3 /dev/zero' ` +
        `--run ${shQuote(script)}`,
    );
    assert.equal(peer.status, 0, peer.stderr);
    assert.equal(mine.stdout, peer.stdout);
    assert.match(mine.stdout, /"export-name": "a",\n\t"description": "first",/);
    assert.match(mine.stdout, /"export-name": "b",\n\t"export-size": 2097152,\n$/);
  });
});

test("extents a plugin reports: nbdinfo --map and REQ_ONE block status as nbdkit's", async () => {
  requireTool("nbdkit");
  // 1 MiB: data, a hole of zeroes, zeroes that are allocated, data again.
  const layout = [[0, 65536, 0], [65536, 131072, 3], [196608, 65536, 2], [262144, 786432, 0]];
  const py = "for off in (0, 70000, 196608, 300000):\n" +
    "    h.block_status(4096, off, lambda m, o, e, err: print(o, e), nbd.CMD_FLAG_REQ_ONE)";
  const script =
    `nbdinfo --map "$uri"; nbdinfo --map --totals "$uri"; nbdsh --base-allocation -u "$uri" -c ${
      shQuote(py)
    }`;
  await withScratch(async (dir) => {
    for (const onlyFirst of [false, true]) {
      const file = join(dir, `extents${onlyFirst}.ts`);
      // With onlyFirst, the plugin reports just the extent at the offset,
      // and the client asks again for the rest.
      writeFileSync(
        file,
        `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
const layout = ${JSON.stringify(layout)};
export default definePlugin({
  name: "extents",
  open: () => null,
  getSize: () => 1 << 20,
  pread: (_h, buf) => void buf.fill(0),
  extents: (_h, count, offset, _flags, sink) => {
    for (const [o, l, t] of layout) {
      if (o + l <= offset || o >= offset + count) continue;
      sink.add(o, l, t);
      if (${onlyFirst}) return;
    }
  },
});
`,
      );
      const awk = onlyFirst
        ? "{ if ($1 + $2 > o && $1 < o + c) { print; exit } }"
        : "{ if ($1 + $2 > o && $1 < o + c) print }";
      const table = layout.map((e) => e.join(" ")).join("\\n");
      const extents = `printf '${table}\\n' | awk -v o=$4 -v c=$3 '${awk}'`;
      const mine = await captive([file], script);
      assert.equal(mine.status, 0, mine.stderr);
      const peer = sh(
        `nbdkit -U - eval get_size='echo 1048576' pread='head -c $3 /dev/zero' ` +
          `extents=${shQuote(extents)} --run ${shQuote(script)}`,
      );
      assert.equal(peer.status, 0, peer.stderr);
      assert.equal(mine.stdout, peer.stdout, `only the first extent: ${onlyFirst}`);
      assert.match(mine.stdout, /^ +65536 +131072 +3 +hole,zero$/m);
    }
  });
});

test("what the server emulates (FUA, zeroes, cache) calls the plugin as nbdkit's does", async () => {
  requireTool("nbdkit");
  const py = "h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA); h.zero(8192, 4096, nbd.CMD_FLAG_FUA); " +
    "h.trim(4096, 65536, nbd.CMD_FLAG_FUA); h.cache(300000, 0); h.flush(); " +
    "h.zero(6 * 1024 * 1024, 2 * 1024 * 1024)";
  const script = `nbdsh -u "$uri" -c ${shQuote(py)}`;
  await withScratch(async (dir) => {
    const log = join(dir, "calls");
    for (const fua of ["emulate", "native"]) {
      const file = join(dir, `calls-${fua}.ts`);
      // Each call of the plugin, one line: what it was asked, with FUA when
      // it is asked to do FUA itself. (CACHE stays at 1 MiB or less: above
      // that ours reads 1 MiB at a time, where nbdkit makes one call of up to
      // 64 MiB. Zeroes are written in one call of up to 64 MiB by both.)
      writeFileSync(
        file,
        `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
import { appendFileSync } from "node:fs";
const log = (line: string) => appendFileSync(${JSON.stringify(log)}, line + "\\n");
export default definePlugin({
  name: "calls",
  open: () => null,
  getSize: () => 8 << 20,
  pread: (_h, buf, offset) => { log(\`pread \${buf.length} \${offset}\`); buf.fill(0); },
  pwrite: (_h, buf, offset, f) => log(\`pwrite \${buf.length} \${offset} \${f.fua ? "fua" : ""}\`),
  flush: () => log("flush"),
  trim: (_h, count, offset, f) => log(\`trim \${count} \${offset} \${f.fua ? "fua" : ""}\`),
  canFua: () => "${fua}",
  canCache: () => "emulate",
});
`,
      );
      rmSync(log, { force: true });
      const mine = await captive([file], script);
      assert.equal(mine.status, 0, mine.stderr);
      const ours = readFileSync(log, "utf8");
      rmSync(log);
      const calls = (m: string) => shQuote(`echo ${m} $3 $4 $5 >> ${log}`);
      const peer = sh(
        `nbdkit -U - eval get_size='echo 8388608' ` +
          `pread=${shQuote(`echo pread $3 $4 >> ${log}; head -c $3 /dev/zero`)} ` +
          `pwrite=${shQuote(`cat >/dev/null; echo pwrite $3 $4 $5 >> ${log}`)} ` +
          `trim=${calls("trim")} flush=${shQuote(`echo flush >> ${log}`)} ` +
          `can_fua='echo ${fua}' can_cache='echo emulate' --run ${shQuote(script)}`,
      );
      assert.equal(peer.status, 0, peer.stderr);
      const theirs = readFileSync(log, "utf8");
      assert.equal(ours.replace(/ +$/gm, ""), theirs.replace(/ +$/gm, ""), `FUA ${fua}`);
      assert.match(
        ours,
        fua === "native"
          ? /^pwrite 512 0 fua\npwrite 8192 4096 fua\ntrim 4096 65536 fua\n/
          : /^pwrite 512 0 ?\nflush\n/,
      );
    }
  });
});

test("the flags a plugin's zero is given are nbdkit's: fua, may_trim, fast", async () => {
  requireTool("nbdkit");
  const py = "h.zero(8192, 4096, nbd.CMD_FLAG_FUA); h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE); " +
    "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO); " +
    "h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)";
  const script = `nbdsh -u "$uri" -c ${shQuote(py)}`;
  await withScratch(async (dir) => {
    const log = join(dir, "zeroes");
    const file = join(dir, "zeroes.ts");
    writeFileSync(
      file,
      `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
import { appendFileSync } from "node:fs";
export default definePlugin({
  name: "zeroes",
  open: () => null,
  getSize: () => 1 << 20,
  pread: (_h, buf) => void buf.fill(0),
  pwrite: () => {},
  zero: (_h, count, offset, f) => {
    // In the order nbdkit's sh and eval plugins print them.
    const flags = [f.fua && "fua", f.mayTrim && "may_trim", f.fastZero && "fast"].filter(Boolean);
    appendFileSync(${JSON.stringify(log)}, \`zero \${count} \${offset} \${flags.join(",")}\\n\`);
  },
  canFua: () => "native",
  canFastZero: () => true,
});
`,
    );
    const mine = await captive([file], script);
    assert.equal(mine.status, 0, mine.stderr);
    const ours = readFileSync(log, "utf8");
    rmSync(log);
    const peer = sh(
      `nbdkit -U - eval get_size='echo 1048576' pread='head -c $3 /dev/zero' pwrite='cat >/dev/null' ` +
        `zero=${shQuote(`echo zero $3 $4 $5 >> ${log}`)} can_fua='echo native' ` +
        `can_fast_zero='exit 0' --run ${shQuote(script)}`,
    );
    assert.equal(peer.status, 0, peer.stderr);
    const theirs = readFileSync(log, "utf8");
    assert.equal(ours.replace(/ +$/gm, ""), theirs.replace(/ +$/gm, ""));
    assert.equal(theirs.split("\n")[0], "zero 8192 4096 fua,may_trim");
  });
});

test("thread models: how many calls and connections run at once, as nbdkit defines them", async () => {
  // Two clients at once, each with 4 reads in flight; each read takes 300 ms.
  // The barrier: both connected before either reads, however slow the
  // handshakes (not with serialize_connections, where the second client is
  // only let in once the first has gone).
  const py = `import os, sys, threading
done = []
both = threading.Barrier(2, timeout=60) if os.environ["BARRIER"] == "1" else None
def client():
    h = nbd.NBD()
    h.connect_uri(uri)
    if both:
        both.wait()
    cookies = [h.aio_pread(nbd.Buffer(512), i * 512) for i in range(4)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    assert all(h.aio_command_completed(c) for c in cookies)
    h.shutdown()
    done.append(True)
uri = os.environ["uri"]
threads = [threading.Thread(target=client) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
sys.exit(0 if len(done) == 2 else 1)`;
  await withScratch(async (dir) => {
    const report = join(dir, "report.json");
    const file = join(dir, "models.ts");
    writeFileSync(
      file,
      `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
import { writeFileSync } from "node:fs";
let model = "parallel";
let active = 0, maxActive = 0, open = 0, maxOpen = 0, perHandle = 0;
export default definePlugin({
  name: "models",
  config: (_key, value) => { model = value; },
  get threadModel() { return model; },
  open: () => { maxOpen = Math.max(maxOpen, ++open); return { active: 0 }; },
  close: () => { open--; },
  getSize: () => 1 << 20,
  async pread(h, buf) {
    maxActive = Math.max(maxActive, ++active);
    perHandle = Math.max(perHandle, ++h.active);
    await new Promise((r) => setTimeout(r, 300));
    active--, h.active--;
    buf.fill(0);
  },
  unload: () => writeFileSync(${
        JSON.stringify(report)
      }, JSON.stringify({ maxActive, maxOpen, perHandle })),
});
`,
    );
    const seen: Record<string, { maxActive: number; maxOpen: number; perHandle: number }> = {};
    for (
      const model of [
        "parallel",
        "serialize_requests",
        "serialize_all_requests",
        "serialize_connections",
      ]
    ) {
      // nbdsh without -u: its own handle makes no connection.
      const barrier = model === "serialize_connections" ? 0 : 1;
      const r = await captive(
        [file, `model=${model}`],
        `BARRIER=${barrier} nbdsh -c ${shQuote(py)}`,
      );
      assert.equal(r.status, 0, `${model}: ${r.stderr}`);
      seen[model] = JSON.parse(readFileSync(report, "utf8"));
    }
    const { parallel, serialize_requests: requests, serialize_all_requests: all } = seen;
    const connections = seen.serialize_connections;
    // Each client's reads overlap the other's: they start together and
    // take 300 ms each (1.2 s a client when they take turns).
    assert.ok(parallel.perHandle === 4 && parallel.maxActive > 4, JSON.stringify(parallel));
    assert.ok(requests.perHandle === 1 && requests.maxActive === 2, JSON.stringify(requests));
    assert.ok(all.maxActive === 1 && all.maxOpen === 2, JSON.stringify(all));
    assert.ok(
      connections.maxOpen === 1 && connections.perHandle === 4,
      JSON.stringify(connections),
    );
  });
});
