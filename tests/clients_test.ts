/**
 * The server core driven by real clients: nbdinfo, nbdsh, qemu-img,
 * qemu-io and nbdcopy, in nbdkit's captive style.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { captive, ourShell, requireTool, scratch, sh, shQuote } from "./helpers.ts";

function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** nbdinfo's description of the first export, without what differs per run. */
function describeExport(json: string): Record<string, unknown> {
  const info = JSON.parse(json);
  const exp = { ...info.exports[0] };
  delete exp.uri;
  return { ...info, exports: [exp] };
}

describe("real clients", () => {
  let dir: string;
  let cleanup: () => void;
  let image: string;
  let imageSum: string;

  before(() => {
    for (const tool of ["nbdinfo", "nbdsh", "nbdcopy", "qemu-img", "qemu-io", "nbdkit"]) {
      requireTool(tool);
    }
    ({ dir, cleanup } = scratch());
    image = join(dir, "random.img");
    const r = sh(`head -c 64M /dev/urandom > ${image}`);
    assert.equal(r.status, 0);
    imageSum = sha256(image);
  });

  after(() => cleanup());

  test("nbdinfo --json describes a 1G memory disk, as nbdkit does", async () => {
    const ours = await captive(["memory", "size=1G"], 'nbdinfo --json "$uri"');
    assert.equal(ours.status, 0, ours.stderr);
    const theirs = sh(`nbdkit -U - memory size=1G --run 'nbdinfo --json "$uri"'`);
    assert.equal(theirs.status, 0, theirs.stderr);
    const o = describeExport(ours.stdout);
    assert.equal((o.exports as Record<string, unknown>[])[0]["export-size"], 1073741824);
    assert.equal((o.exports as Record<string, unknown>[])[0].is_read_only, false);
    // Identical apart from the socket path in "uri" (a private directory per run).
    assert.deepEqual(o, describeExport(theirs.stdout));
  });

  test("nbdinfo --json with -r and for the null plugin matches nbdkit", async () => {
    for (
      const args of [["-r", "memory", "size=64M"], ["null", "size=1M"], ["--no-sr", "memory", "1M"]]
    ) {
      const ours = await captive(args, 'nbdinfo --json "$uri"');
      assert.equal(ours.status, 0, ours.stderr);
      const theirs = sh(`nbdkit -U - ${args.join(" ")} --run 'nbdinfo --json "$uri"'`);
      assert.deepEqual(describeExport(ours.stdout), describeExport(theirs.stdout), args.join(" "));
    }
  });

  test("64 MiB of random data in with qemu-img convert, out with nbdcopy: same checksum", async () => {
    const out = join(dir, "out.img");
    const r = await captive(
      ["memory", "size=64M"],
      `qemu-img convert -n -f raw ${image} -O raw "$nbd" && nbdcopy "$uri" ${out}`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(sha256(out), imageSum);
  });

  test("nbdcopy in and qemu-img out (many requests in flight, several connections)", async () => {
    const out = join(dir, "out2.img");
    const r = await captive(
      ["memory", "size=64M"],
      `nbdcopy --connections=4 --requests=64 ${image} "$uri" && qemu-img convert -f raw "$nbd" -O raw ${out}`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(sha256(out), imageSum);
  });

  test("zero, trim, flush and base:allocation on the memory plugin", async () => {
    const r = await captive(
      ["memory", "size=8M"],
      `qemu-io -f raw -c 'write -P 0xab 0 8M' -c 'write -z 1M 1M' -c 'discard 4M 2M' -c flush "$nbd" >/dev/null &&
       qemu-io -f raw -c 'read -P 0xab 0 1M' -c 'read -P 0 1M 1M' -c 'read -P 0xab 2M 2M' -c 'read -P 0 4M 2M' -c 'read -P 0xab 6M 2M' "$nbd" | grep -c '^read' &&
       nbdinfo --map "$uri"`,
    );
    assert.equal(r.status, 0, r.stderr);
    const [count, ...map] = r.stdout.trim().split("\n");
    assert.equal(count, "5");
    const rows = map.map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
    assert.deepEqual(rows, [
      [0, 1048576, 0],
      [1048576, 1048576, 3],
      [2097152, 2097152, 0],
      [4194304, 2097152, 3],
      [6291456, 2097152, 0],
    ]);
  });

  test("nbdsh: block status with REQ_ONE, FUA writes, cache, fast zero", async () => {
    const py = [
      "h.pwrite(b'x' * 65536, 65536, nbd.CMD_FLAG_FUA)",
      "seen = []",
      "def f(ctx, off, ents, err):",
      "    seen.append((ctx, list(ents)))",
      "h.block_status(4 * 65536, 0, f, nbd.CMD_FLAG_REQ_ONE)",
      "print(seen[0][0], seen[0][1][:2])",
      "h.cache(65536, 0)",
      "h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)",
      "print(h.pread(4, 65536) == bytes(4))",
    ].join("\n");
    const r = await captive(["memory", "size=1M"], `nbdsh --base-allocation -u "$uri" -c "${py}"`);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "base:allocation [65536, 3]\nTrue\n");
  });

  test("-e names the export in $uri only: the listing is the plugin's, as nbdkit's", async () => {
    const script =
      'nbdinfo --list --json "$uri" | grep export-name; nbdinfo --json "$uri" | grep export-name';
    const r = await captive(["-e", "disk1", "memory", "size=1M"], script);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, '\t"export-name": "",\n\t"export-name": "disk1",\n');
    assert.equal(
      sh(`nbdkit -U - -e disk1 memory size=1M --run ${shQuote(script)}`).stdout,
      r.stdout,
    );
  });

  test("--run propagates the command's exit status", async () => {
    assert.equal((await captive(["null", "size=1M"], "exit 0")).status, 0);
    assert.equal((await captive(["null", "size=1M"], "exit 42")).status, 42);
    const killed = await captive(["null", "size=1M"], "kill -KILL $$");
    assert.equal(killed.status, 137);
    assert.match(killed.stderr, /killed by signal 9/);
  });

  test("captive mode sets $uri, $nbd, $unixsocket, $port, $exportname", async () => {
    const r = await captive(
      ["-e", "foo", "null", "size=1M"],
      'echo "$uri|$nbd|$unixsocket|$port|$exportname"',
    );
    assert.equal(r.status, 0, r.stderr);
    const [uri, nbd, socket, port, name] = r.stdout.trim().split("|");
    assert.equal(uri, `nbd+unix:///foo?socket=${socket}`);
    assert.equal(nbd, uri);
    assert.equal(port, "");
    assert.equal(name, "foo");
  });

  test("-s serves one client over stdin/stdout", () => {
    const r = sh(
      `nbdsh -c 'h.connect_command(["sh", "-c", ${
        JSON.stringify(`exec ${ourShell()} -s memory size=1M`)
      }])
h.pwrite(b"hello", 4096)
print(h.get_size(), h.pread(5, 4096))'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "1048576 bytearray(b'hello')");
  });

  test("-r: clients see a read-only export and writes fail", async () => {
    const r = await captive(
      ["-r", "memory", "size=1M"],
      `nbdsh -u "$uri" -c '
print(h.is_read_only())
h.set_strict_mode(0)
try:
    h.pwrite(b"x", 0)
except nbd.Error as e:
    print(e.errno)'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "True\nEPERM\n");
  });

  test("the file plugin serves a file, read and write", async () => {
    const file = join(dir, "file.img");
    writeFileSync(file, new Uint8Array(1024 * 1024).fill(7));
    const r = await captive(
      ["file", file],
      `nbdsh -u "$uri" -c 'h.pwrite(b"abc", 1000); print(h.get_size(), h.pread(4, 999))'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "1048576 bytearray(b'\\x07abc')");
    assert.deepEqual([...readFileSync(file).subarray(999, 1003)], [7, 97, 98, 99]);
  });
});
