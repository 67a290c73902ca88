/**
 * The example plugins of plugins/examples/, loaded by path as users run
 * them (`nbdkit-ts ./plugins/examples/X.ts …`) and driven by nbdsh and
 * qemu-img; the copy-on-write one also wraps another plugin in-process.
 *
 * On Node the command line is the npm build, which loads the `.ts` examples
 * through its TypeScript hooks (runtime/node_ts_hooks.ts).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createMemoryPlugin, serve } from "../mod.ts";
import { createCowPlugin } from "../plugins/examples/cow.ts";
import { captive, nbdkitTs, REPO, requireTool, run, scratch } from "./helpers.ts";

/** The path of an example plugin, as a user would type it. */
const example = (name: string): string => join(REPO, "plugins", "examples", `${name}.ts`);

/** The pattern plugin's bytes: each 8-byte word is its own offset, big-endian. */
function pattern(offset: number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  const word = new DataView(new ArrayBuffer(8));
  for (let i = 0; i < length; i++) {
    const at = offset + i;
    word.setBigUint64(0, BigInt(at - (at % 8)));
    bytes[i] = word.getUint8(at % 8);
  }
  return bytes;
}

describe("plugin modules on the command line", () => {
  let dir: string;
  let cleanup: () => void;

  before(() => {
    ({ dir, cleanup } = scratch());
    const files: Record<string, string> = {
      "plain.js": `export default {
  name: "plain",
  open: () => null,
  getSize: () => 1024,
  pread: (_h, buf) => void buf.fill(7),
};`,
      "broken-import.js": `import { nothing } from "./nonexistent.js";\nexport default nothing;`,
      "syntax.js": "export default {{{ ;",
      "throws.js": `throw new Error("boom at import\\n  second line");`,
      "half.js": `export default { name: "half", open: () => null };`,
      "factory.js": `export default function createPlugin() { return {}; }`,
      "no-default.js": "export const size = 1;",
    };
    for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  });
  after(() => cleanup());

  /** Exit status 1 and exactly one line on stderr, matching `pattern`. */
  async function failsWith(file: string, pattern: RegExp): Promise<void> {
    const r = await nbdkitTs(["-U", "-", join(dir, file), "--run", "true"]);
    assert.equal(r.status, 1, `${file}: ${r.stderr}`);
    assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, /^nbdkit-ts: error: cannot open plugin '[^']+': /);
    assert.match(r.stderr, pattern);
  }

  test("a .js module whose default export is a plugin", async () => {
    requireTool("nbdsh");
    const r = await captive(
      [join(dir, "plain.js")],
      `nbdsh -u "$uri" -c 'print(h.pread(4, 0).hex(), h.is_read_only(), h.get_size())'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "07070707 True 1024\n");
  });

  test("a module that fails to import: one line, exit 1", async () => {
    await failsWith("broken-import.js", /nonexistent\.js/);
    await failsWith("syntax.js", /syntax\.js': \S/);
    await failsWith("throws.js", /throws\.js': boom at import second line\n$/);
  });

  test("a default export that is not a whole plugin: one line, exit 1", async () => {
    await failsWith("half.js", /plugin 'half' must define getSize\(\), pread\(\)/);
    await failsWith("factory.js", /its default export is a function, not a plugin/);
    await failsWith("no-default.js", /the module has no default export that is a plugin/);
  });
});

describe("example plugins", () => {
  let dir: string;
  let cleanup: () => void;

  before(() => {
    for (const tool of ["nbdsh", "nbdinfo", "qemu-img", "qemu-io"]) requireTool(tool);
    ({ dir, cleanup } = scratch());
  });
  after(() => cleanup());

  test("pattern.ts: offsets as big-endian words, read-only, up to 2^53", async () => {
    const out = join(dir, "pattern.img");
    const r = await captive(
      [example("pattern"), "size=1M"],
      `qemu-img convert -f raw "$uri" -O raw ${out} &&
       nbdsh -u "$uri" -c 'import errno
print(h.pread(16, 4092).hex(), h.is_read_only(), h.get_size())
try:
    h.pwrite(b"x", 0)
except nbd.Error as e:
    print(errno.errorcode[e.errnum])'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "00000ff8000000000000100000000000 True 1048576\nEPERM\n");
    assert.deepEqual(new Uint8Array(readFileSync(out)), pattern(0, 1 << 20));

    // Near 2^53, and a size with a suffix that needs more than 32 bits.
    const big = await captive(
      [example("pattern"), "size=7E"],
      `nbdsh -u "$uri" -c 'print(h.pread(12, 2**53 - 20).hex(), h.get_size())'`,
    );
    assert.equal(big.status, 0, big.stderr);
    assert.equal(big.stdout, `ffffffe8001ffffffffffff0 ${7n << 60n}\n`);

    const missing = await captive([example("pattern")], "true");
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /^nbdkit-ts: error: you must specify size=<SIZE>/);
  });

  test("cow.ts over a file: writes stay in memory, every connection sees them, the file is untouched", async () => {
    const image = join(dir, "base.img");
    const size = (1 << 20) + 100; // the last block is short
    const original = randomBytes(size);
    writeFileSync(image, original);
    const out = join(dir, "cow-out.img");
    const r = await captive(
      [example("cow"), image],
      `qemu-io -f raw -c "write -P 0x55 4000 200" -c "write -z 65536 65536" "$uri" >/dev/null &&
       nbdsh -u "$uri" -c 'h.pwrite(b"tail", ${
        size - 4
      }); print(h.is_read_only(), h.can_multi_conn())' &&
       qemu-img convert -f raw "$uri" -O raw ${out}`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "False True\n");

    const expected = Uint8Array.from(original);
    expected.fill(0x55, 4000, 4200);
    expected.fill(0, 65536, 131072);
    expected.set(new TextEncoder().encode("tail"), size - 4);
    // qemu-img rounds the copy up to whole sectors.
    const copy = new Uint8Array(readFileSync(out));
    assert.deepEqual(copy.subarray(0, size), expected);
    assert.ok(copy.subarray(size).every((b) => b === 0));
    assert.deepEqual(new Uint8Array(readFileSync(image)), new Uint8Array(original));
  });

  test("createCowPlugin() wraps any plugin: a memory disk underneath is never written", async () => {
    const memory = createMemoryPlugin();
    const server = await serve(createCowPlugin(memory), {
      unixSocket: join(dir, "cow.sock"),
      config: { size: "1M" },
    });
    try {
      // Data below from 512 KiB on, written in-process: large reads of it
      // are lent by the memory plugin, not copied into the overlay's buffer.
      const data = new Uint8Array(randomBytes(256 * 1024));
      await memory.pwrite!(null, data, 512 * 1024, { fua: false });
      const r = await run([
        "nbdsh",
        "-u",
        server.uri,
        "-c",
        `import hashlib; h.pwrite(b"\\xab" * 10000, 5000); ` +
        `print(h.pread(4, 4998).hex(), h.pread(4, 14998).hex(), ` +
        `hashlib.sha256(h.pread(256 * 1024, 512 * 1024)).hexdigest())`,
      ]);
      assert.equal(r.status, 0, r.stderr);
      const sha = createHash("sha256").update(data).digest("hex");
      assert.equal(r.stdout.trim(), `0000abab abab0000 ${sha}`);
      const below = new Uint8Array(20000);
      await memory.pread(null, below, 0);
      assert.ok(below.every((b) => b === 0), "the plugin underneath was written");
    } finally {
      await server.close();
    }
  });

  describe("http.ts against a local web server", () => {
    const object = randomBytes(3 * (1 << 20) + 512);
    const ranges: string[] = [];
    const web = createServer((req: IncomingMessage, res: ServerResponse) => {
      if (req.url === "/no-range.img") return void res.end(object); // 200, whole object
      if (req.url !== "/disk.img") return void res.writeHead(404).end();
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? "");
      if (!range) return void res.end(object);
      ranges.push(range[0]);
      const start = Number(range[1]);
      const end = Math.min(Number(range[2]), object.length - 1);
      if (start >= object.length) {
        return void res.writeHead(416, { "content-range": `bytes */${object.length}` }).end();
      }
      res.writeHead(206, { "content-range": `bytes ${start}-${end}/${object.length}` });
      res.end(object.subarray(start, end + 1));
    });
    let base: string;

    before(async () => {
      await new Promise<void>((resolve) => web.listen(0, "127.0.0.1", resolve));
      base = `http://127.0.0.1:${(web.address() as AddressInfo).port}`;
    });
    after(() => new Promise<void>((resolve) => web.close(() => resolve())));

    test("qemu-img copies the object, read with Range requests", async () => {
      const out = join(dir, "http-out.img");
      const r = await captive(
        [example("http"), `url=${base}/disk.img`],
        `qemu-img convert -f raw "$uri" -O raw ${out} &&
         nbdsh -u "$uri" -c 'print(h.is_read_only(), h.get_size())'`,
        { NO_PROXY: "127.0.0.1" },
      );
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, `True ${object.length}\n`);
      assert.deepEqual(new Uint8Array(readFileSync(out)), new Uint8Array(object));
      assert.ok(ranges.includes("bytes=0-0"), "the size comes from a one-byte range");
      assert.ok(ranges.length > 2, `only ${ranges.length} range requests`);
    });

    // The server logs a failed open at debug level only (nbdkit logs it as an error): hence -v.
    test("a web server without Range support, or a missing object, is refused at connection", async () => {
      for (const [path, status] of [["/no-range.img", 200], ["/missing.img", 404]] as const) {
        const r = await captive(
          ["-v", example("http"), `url=${base}${path}`],
          `nbdinfo "$uri"`,
          { NO_PROXY: "127.0.0.1" },
        );
        assert.notEqual(r.status, 0);
        assert.match(
          r.stderr,
          new RegExp(
            `http\\[1\\]: (?:error|debug): .*${path}: the server does not honour Range \\(HTTP ${status}\\)`,
          ),
        );
      }
    });
  });
});
