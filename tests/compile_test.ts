/**
 * The single binary: `deno task compile` (`bun build --compile`, offline)
 * makes one executable, which must serve the memory, streaming and libvirt
 * plugins and a plugin file with no runtime installed beside it. Each run
 * gets a PATH that holds only the clients it needs (symbolic links in a
 * scratch folder), so no `deno`, `bun` or `node` can be found.
 *
 * Runs under Bun only: the binary is Bun's whichever runtime runs this file,
 * so one stage proves it, and CI time is short.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { REPO, requireTool, type Result, run, RUNTIME, scratch, sh, shQuote } from "./helpers.ts";
import { assertQemuImgWritesFifo, withLibvirtSda } from "./helpers.ts";

const SKIP = RUNTIME === "bun"
  ? false
  : "the binary is Bun's: tested once, in the Bun stage (tests/run.sh)";

/** What the `--run` scripts and the server itself may call. */
const TOOLS = ["sh", "nbdinfo", "nbdcopy", "qemu-img", "sha256sum", "cat"];

describe("the compiled binary (deno task compile)", () => {
  let dir: string;
  let cleanup: () => void;
  let binary: string;
  let env: Record<string, string>;

  /** Run the binary with `args` where no JavaScript runtime is on the PATH. */
  const binaryRun = (args: string[]): Promise<Result> => run([binary, ...args], { env, cwd: dir });

  before(async () => {
    if (SKIP) return;
    for (const tool of TOOLS) requireTool(tool);
    ({ dir, cleanup } = scratch());
    const started = Date.now();
    const compiled = await run([join(REPO, "node_modules", ".bin", "deno"), "task", "compile"], {
      cwd: REPO,
    });
    assert.equal(compiled.status, 0, compiled.stderr);
    console.log(`deno task compile: ${Date.now() - started} ms`);
    // A copy away from the repository, as a user would install it.
    binary = join(dir, "nbdkit-ts");
    copyFileSync(join(REPO, "dist", "nbdkit-ts"), binary);
    const bin = join(dir, "bin");
    mkdirSync(bin);
    for (const tool of TOOLS) {
      symlinkSync(sh(`command -v ${tool}`).stdout.trim(), join(bin, tool));
    }
    env = { PATH: bin, HOME: dir, LANG: "C.UTF-8" };
    const found = sh("command -v deno bun node npm npx", env);
    assert.equal(found.stdout, "", `a runtime is still on the PATH: ${found.stdout}`);
  });

  after(() => cleanup?.());

  test("--version says Bun", { skip: SKIP }, async () => {
    const r = await binaryRun(["--version"]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^nbdkit-ts \d+\.\d+\.\d+ \(bun /);
  });

  test("memory plugin, captive: nbdinfo", { skip: SKIP }, async () => {
    const r = await binaryRun(["-U", "-", "memory", "size=64M", "--run", 'nbdinfo --size "$uri"']);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "67108864");
  });

  test("memory plugin in the background (-P), then stopped", { skip: SKIP }, async () => {
    const socket = join(dir, "bg.sock");
    const pidfile = join(dir, "bg.pid");
    const r = await binaryRun(["-P", pidfile, "-U", socket, "memory", "size=1M"]);
    assert.equal(r.status, 0, r.stderr);
    const info = sh(`nbdinfo --size ${shQuote(`nbd+unix:///?socket=${socket}`)}`);
    sh(`kill $(cat ${shQuote(pidfile)})`);
    assert.equal(info.stdout.trim(), "1048576", info.stderr);
  });

  test("streaming plugin: qemu-img writes a disk into write=FIFO", { skip: SKIP }, async () => {
    const fifo = join(dir, "fifo");
    await assertQemuImgWritesFifo(
      join(dir, "source.raw"),
      fifo,
      "16M",
      (script) => binaryRun(["-U", "-", "streaming", `write=${fifo}`, "--run", script]),
    );
  });

  test("libvirt plugin: nbdcopy reads a guest's disk", { skip: SKIP }, async () => {
    await withLibvirtSda(async (args, sha256) => {
      const r = await binaryRun(args);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout.split(" ")[0], sha256);
    });
  });

  test("a plugin from a .ts file", { skip: SKIP }, async () => {
    const file = join(dir, "sevens.ts");
    writeFileSync(
      file,
      `const size: number = 4096;
export default {
  name: "sevens",
  open: () => null,
  getSize: () => size,
  pread: (_h: null, buf: Uint8Array) => void buf.fill(7),
};
`,
    );
    const r = await binaryRun(["-U", "-", file, "--run", 'nbdinfo --size "$uri"']);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "4096");
  });
});
