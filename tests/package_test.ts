/**
 * The npm package as a user gets it: `npm pack` of the build in npm/dist,
 * installed into an empty folder with `npm install ./nbdkit-ts-X.tgz`, then
 * run with `npx nbdkit-ts …` (Node) and `bunx nbdkit-ts …` (`--bun`: Bun
 * runs the same JavaScript), including the libvirt plugin (koffi on Node,
 * bun:ffi on Bun), the streaming plugin, a JavaScript plugin that imports
 * `nbdkit-ts`, and the `.d.ts` types seen from a TypeScript program.
 *
 * Runs under Node only: it needs the npm build, which tests/run.sh makes in
 * the Node stage (`deno task build:npm`), and what it checks does not depend
 * on the runtime running the test file. `npx --offline` and `bunx
 * --no-install` never fetch nbdkit-ts from a registry: the installed copy
 * runs, or the test fails. Installing may fetch koffi, an optional dependency, from
 * npm's cache or registry; without it the libvirt plugin must say so on Node.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { REPO, requireTool, type Result, run, RUNTIME, scratch, sh, shQuote } from "./helpers.ts";
import { assertQemuImgWritesFifo, withLibvirtSda } from "./helpers.ts";

const SKIP = RUNTIME === "node"
  ? false
  : "needs the npm build, made in the Node stage of tests/run.sh; it tests the package, not the runtime running this file";

const DIST = join(REPO, "npm", "dist");
const BIN = join(REPO, "node_modules", ".bin");

describe("the npm package (npm pack, npm install, npx, bunx)", () => {
  let dir: string;
  let app: string;
  let cleanup: () => void;
  let version: string;
  let tarball: string;
  let koffi: boolean;

  /** Run a command in the folder the package is installed in. */
  const inApp = (argv: string[], timeoutMs = 120_000): Promise<Result> =>
    run(argv, { cwd: app, timeoutMs });
  const npx = (args: string[]) => inApp(["npx", "--offline", "nbdkit-ts", ...args]);
  const bunx = (args: string[]) =>
    inApp([join(BIN, "bunx"), "--no-install", "--bun", "nbdkit-ts", ...args]);

  /** `-U - memory size=64M --run 'nbdinfo "$uri"'` through `cli` (npx or bunx): 64 MiB. */
  const assertMemory64M = async (cli: (args: string[]) => Promise<Result>) => {
    const r = await cli(["-U", "-", "memory", "size=64M", "--run", 'nbdinfo "$uri"']);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /export-size: 67108864 /);
  };

  before(async () => {
    if (SKIP) return;
    for (const tool of ["npm", "npx", "nbdinfo", "nbdcopy", "qemu-img", "sha256sum"]) {
      requireTool(tool);
    }
    if (!existsSync(join(DIST, "package.json"))) {
      throw new Error("npm/dist is not built: run `deno task build:npm` (tests/run.sh does)");
    }
    version = JSON.parse(readFileSync(join(DIST, "package.json"), "utf8")).version;
    ({ dir, cleanup } = scratch());
    let started = Date.now();
    const pack = await run(["npm", "pack", "--json", "--pack-destination", dir], { cwd: DIST });
    assert.equal(pack.status, 0, pack.stderr);
    tarball = join(dir, JSON.parse(pack.stdout)[0].filename);
    console.log(`npm pack: ${Date.now() - started} ms`);
    // An empty project: a package.json of its own, so that npm installs here.
    app = join(dir, "app");
    sh(`mkdir ${shQuote(app)}`);
    writeFileSync(join(app, "package.json"), '{ "name": "app", "private": true }\n');
    started = Date.now();
    const install = await inApp(
      ["npm", "install", "--no-audit", "--no-fund", "--prefer-offline", tarball],
      300_000,
    );
    assert.equal(install.status, 0, install.stderr);
    console.log(`npm install: ${Date.now() - started} ms`);
    koffi = existsSync(join(app, "node_modules", "koffi", "package.json"));
  });

  after(() => cleanup?.());

  test(
    "the tarball: package.json, README, LICENSE, ESM with types and maps",
    { skip: SKIP },
    () => {
      const files = sh(`tar tzf ${shQuote(tarball)}`).stdout.split("\n");
      for (
        const f of [
          "package.json",
          "README.md",
          "LICENSE",
          "esm/cli.js",
          "esm/mod.js",
          "esm/mod.d.ts",
          "esm/mod.js.map",
          "esm/runtime/node.js",
          "esm/runtime/bun.js",
          "esm/runtime/libvirt/node.js",
        ]
      ) {
        assert.ok(files.includes(`package/${f}`), `${f} is missing from the tarball`);
      }
      assert.ok(!files.some((f) => f.includes("_test.")), "tests are in the tarball");
      const installed = join(app, "node_modules", "nbdkit-ts");
      const pkg = JSON.parse(readFileSync(join(installed, "package.json"), "utf8"));
      assert.equal(pkg.name, "nbdkit-ts");
      assert.deepEqual(pkg.bin, { "nbdkit-ts": "./esm/cli.js" });
      assert.deepEqual(Object.keys(pkg.exports), [".", "./cli"]);
      assert.ok(pkg.optionalDependencies.koffi);
      assert.match(
        readFileSync(join(installed, "esm", "cli.js"), "utf8"),
        /^#!\/usr\/bin\/env node\n/,
      );
    },
  );

  test("npx nbdkit-ts --version", { skip: SKIP }, async () => {
    const r = await npx(["--version"]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^nbdkit-ts ${version} \\(node v?\\d+`));
  });

  test("npx nbdkit-ts -U - memory size=64M --run 'nbdinfo \"$uri\"'", { skip: SKIP }, async () => {
    await assertMemory64M(npx);
  });

  test(
    "bunx nbdkit-ts --version (the bin's shebang picks Node; --bun, Bun)",
    { skip: SKIP },
    async () => {
      const plain = await inApp([join(BIN, "bunx"), "--no-install", "nbdkit-ts", "--version"]);
      assert.equal(plain.status, 0, plain.stderr);
      assert.match(plain.stdout, new RegExp(`^nbdkit-ts ${version} \\((node|bun) `));
      const bun = await bunx(["--version"]);
      assert.equal(bun.status, 0, bun.stderr);
      assert.match(bun.stdout, new RegExp(`^nbdkit-ts ${version} \\(bun `));
    },
  );

  test("bunx --bun nbdkit-ts -U - memory size=64M --run nbdinfo", { skip: SKIP }, async () => {
    await assertMemory64M(bunx);
  });

  test(
    "bunx --bun nbdkit-ts streaming pipe=out.raw, written by qemu-img",
    { skip: SKIP },
    async () => {
      // out.raw: a FIFO, as in the manual; its reader hashes it
      await assertQemuImgWritesFifo(
        join(dir, "source.raw"),
        join(app, "out.raw"),
        "8M",
        (script) => bunx(["-U", "-", "streaming", "pipe=out.raw", "--run", script]),
      );
    },
  );

  test("libvirt plugin: npx (koffi) and bunx --bun (bun:ffi)", { skip: SKIP }, async () => {
    await withLibvirtSda(async (args, sha) => {
      const node = await npx(args);
      if (koffi) {
        assert.equal(node.status, 0, node.stderr);
        assert.equal(node.stdout.split(" ")[0], sha);
      } else {
        // koffi is optional: skipped (e.g. no registry), the plugin says what is missing.
        assert.equal(node.status, 1);
        assert.match(node.stderr, /needs the npm package 'koffi'/);
      }
      const bun = await bunx(args);
      assert.equal(bun.status, 0, bun.stderr);
      assert.equal(bun.stdout.split(" ")[0], sha);
    });
  });

  test("a JavaScript plugin that imports nbdkit-ts; a .ts one needs a newer Node or typescript", {
    skip: SKIP,
  }, async () => {
    writeFileSync(
      join(app, "sevens.mjs"),
      `import { definePlugin } from "nbdkit-ts";
export default definePlugin({
  name: "sevens",
  open: () => null,
  getSize: () => 4096,
  pread: (_h, buf) => void buf.fill(7),
});
`,
    );
    const js = await npx(["-U", "-", "./sevens.mjs", "--run", 'nbdinfo --size "$uri"']);
    assert.equal(js.status, 0, js.stderr);
    assert.equal(js.stdout.trim(), "4096");

    writeFileSync(
      join(app, "typed.ts"),
      `import { definePlugin } from "nbdkit-ts";
const size: number = 4096;
export default definePlugin({ name: "typed", open: () => null, getSize: () => size, pread() {} });
`,
    );
    const ts = await npx(["-U", "-", "./typed.ts", "--run", 'nbdinfo --size "$uri"']);
    const [major, minor] = process.versions.node.split(".").map(Number);
    if (major > 22 || (major === 22 && minor >= 18)) {
      assert.equal(ts.status, 0, ts.stderr); // Node strips the types itself
    } else {
      // No typescript in this project: one line that says what to do.
      assert.equal(ts.status, 1);
      const lines = ts.stderr.trimEnd().split("\n").filter((l) => !l.startsWith("npm "));
      assert.equal(lines.length, 1, ts.stderr);
      assert.match(ts.stderr, /cannot load TypeScript.*'typescript'/);
    }
  });

  test("the .d.ts types, from a strict TypeScript program without @types/node", {
    skip: SKIP,
  }, async () => {
    writeFileSync(
      join(app, "consumer.mts"),
      `import { createMemoryPlugin, definePlugin, NbdError, parseSize, serve } from "nbdkit-ts";
import type { Plugin, RunningServer } from "nbdkit-ts";
const disk = new Uint8Array(4096);
const plugin: Plugin<Uint8Array> = definePlugin({
  name: "ram",
  open: () => disk,
  getSize: (d) => d.length,
  pread: (d, buf, offset) => void buf.set(d.subarray(offset, offset + buf.length)),
  pwrite(d, buf, offset) {
    if (buf[0] === 0xff) throw new NbdError("EPERM", "refused");
    d.set(buf, offset);
  },
});
const server: RunningServer = await serve(plugin, { unixSocket: "ram.sock" });
const size: bigint = parseSize("1M");
console.log(server.uri, size, createMemoryPlugin().name);
await server.close();
`,
    );
    writeFileSync(
      join(app, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          strict: true,
          module: "nodenext",
          target: "es2022",
          lib: ["es2023", "dom"],
          types: [],
          noEmit: true,
        },
        files: ["consumer.mts"],
      }),
    );
    const r = await inApp([
      "node",
      join(REPO, "node_modules", "typescript", "bin", "tsc"),
      "-p",
      ".",
    ]);
    assert.equal(r.status, 0, r.stdout + r.stderr);
  });
});
