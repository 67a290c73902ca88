/**
 * Shared helpers of the interop tests: run our command line under the
 * runtime that runs the tests, run real clients, make scratch files.
 *
 * Tests use `node:` built-ins only, which Deno, Bun and Node all provide.
 *
 * @module
 */
import assert from "node:assert/strict";
import { spawn, spawnSync, type SpawnSyncReturns } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setupLibvirt } from "./libvirt_env.ts";

/**
 * The environment for clients: Debian's python3 first (for nbdsh and the nbd
 * module), `NBDKIT_TS` set to our command line so `--run` scripts can call it.
 */
export const CLIENT_ENV: Record<string, string> = {
  ...(process.env as Record<string, string>),
  PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ""}`,
  LANG: "C.UTF-8",
};

function whichRuntime(): "deno" | "bun" | "node" {
  const g = globalThis as { Deno?: unknown; Bun?: unknown };
  if (g.Deno) return "deno";
  if (g.Bun) return "bun";
  return "node";
}

/** The runtime running the tests, which is the one our server runs on. */
export const RUNTIME: "deno" | "bun" | "node" = whichRuntime();

/**
 * The repository's root folder. On Node the tests run compiled, from
 * `npm/.test-build/tests/` (see npm/build.ts).
 */
export const REPO: string = join(
  dirname(fileURLToPath(import.meta.url)),
  RUNTIME === "node" ? "../../.." : "..",
);

/**
 * The root of the code our server runs: the repository on Deno and Bun; on
 * Node the npm build, `npm/dist/esm/`, where each `X.ts` of the repository is
 * `X.js` (a plugin importing `${ROOT}/mod.ts` gets the built `mod.js` there:
 * runtime/node_ts_hooks.ts).
 */
export const ROOT: string = RUNTIME === "node" ? join(REPO, "npm", "dist", "esm") : REPO;

/**
 * The argv that starts our command line on the runtime running the tests.
 * `NBDKIT_TS_CMD` (a JSON array) overrides it, e.g. to test a compiled binary.
 */
export function ourCommand(): string[] {
  const override = process.env.NBDKIT_TS_CMD;
  if (override) return JSON.parse(override);
  switch (RUNTIME) {
    case "deno":
      return [process.execPath, "run", "-A", "--no-check", join(ROOT, "cli.ts")];
    case "bun":
      return [process.execPath, join(ROOT, "cli.ts")];
    case "node":
      return [process.execPath, join(ROOT, "cli.js")];
  }
}

/** Quote one word for /bin/sh. */
export function shQuote(word: string): string {
  return /^[A-Za-z0-9_\/.,:=+@%-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

/** Our command line as one shell string, for use inside shell scripts. */
export function ourShell(): string {
  return ourCommand().map(shQuote).join(" ");
}

/** The result of a finished command. */
export interface Result {
  status: number;
  stdout: string;
  stderr: string;
}

function toResult(r: SpawnSyncReturns<string>): Result {
  if (r.error) throw r.error;
  return {
    status: r.status ?? 128 + (r.signal ? 15 : 0),
    stdout: r.stdout,
    stderr: r.stderr,
  };
}

/**
 * Run our command line with `args` and wait for it (async, so a server in
 * the same test process keeps serving).
 */
export function nbdkitTs(
  args: string[],
  options: { input?: string | Uint8Array; env?: Record<string, string>; timeoutMs?: number } = {},
): Promise<Result> {
  const [cmd, ...pre] = ourCommand();
  return run([cmd, ...pre, ...args], options);
}

/** Run any command asynchronously and collect its output. */
export function run(
  argv: string[],
  options: {
    input?: string | Uint8Array;
    env?: Record<string, string>;
    timeoutMs?: number;
    cwd?: string;
  } = {},
): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0], argv.slice(1), {
      env: { ...CLIENT_ENV, ...options.env },
      cwd: options.cwd,
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8");
    child.stderr.setEncoding("utf8");
    child.stdout.on("data", (d: string) => stdout += d);
    child.stderr.on("data", (d: string) => stderr += d);
    const timer = setTimeout(() => child.kill("SIGKILL"), options.timeoutMs ?? 120_000);
    child.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ status: code ?? (signal ? 128 + 9 : 1), stdout, stderr });
    });
    child.stdin.on("error", () => {});
    child.stdin.end(options.input ?? "");
  });
}

/** Run a shell script synchronously (clients only: never our server in-process). */
export function sh(script: string, env: Record<string, string> = {}): Result {
  return toResult(
    spawnSync("/bin/sh", ["-c", script], {
      env: { ...CLIENT_ENV, ...env },
      encoding: "utf8",
      maxBuffer: 256 * 1024 * 1024,
    }),
  );
}

/**
 * A shell loop that waits until `[ TEST ]` holds, for at most `seconds`
 * (then the script goes on, and its own checks fail).
 *
 * @param test A `test(1)` expression, such as `-S /path/to/socket`.
 * @param seconds How long to wait at most.
 * @returns The loop, to splice into a script.
 */
export function shWaitFor(test: string, seconds = 10): string {
  return `for i in $(seq ${Math.ceil(seconds / 0.05)}); do [ ${test} ] && break; sleep 0.05; done`;
}

/** Run a shell script asynchronously. */
export function shAsync(script: string, env: Record<string, string> = {}): Promise<Result> {
  return run(["/bin/sh", "-c", script], { env });
}

/**
 * Run a captive server: `nbdkit-ts -U - ARGS --run SCRIPT`. The script sees
 * `$uri`, `$nbd`, `$unixsocket` as nbdkit's captive mode sets them.
 */
export function captive(args: string[], script: string, env: Record<string, string> = {}) {
  return nbdkitTs(["-U", "-", ...args, "--run", script], { env });
}

/** A scratch folder, removed by the returned function. */
export function scratch(): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), "nbdkit-ts-test-"));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Run `body` with a fresh scratch folder of its own, removed afterwards. */
export async function withScratch(body: (dir: string) => Promise<void>): Promise<void> {
  const { dir, cleanup } = scratch();
  try {
    await body(dir);
  } finally {
    cleanup();
  }
}

/** Throw unless `tool` is on the PATH: a missing client is a failure, not a skip. */
export function requireTool(tool: string): void {
  const r = sh(`command -v ${shQuote(tool)}`);
  if (r.status !== 0) {
    throw new Error(`Required tool '${tool}' is not installed (see design.md §5, .ci/run)`);
  }
}

/** Python code run by Debian's nbdsh; returns the result. */
export function nbdsh(uri: string, python: string): Result {
  return toResult(
    spawnSync("nbdsh", ["-u", uri, "-c", python], {
      env: CLIENT_ENV,
      encoding: "utf8",
    }),
  );
}

/** A server started in the background of a test. */
export interface TestServer {
  /** The Unix socket it listens on. */
  socket: string;
  /** Its NBD URI. */
  uri: string;
  /** Everything it wrote on stderr so far. */
  stderr(): string;
  /** Wait (up to 10 s) until stderr matches `pattern`; the text is returned for assertions. */
  waitForStderr(pattern: RegExp): Promise<string>;
  /** Stop it with SIGTERM and wait; resolves to its exit status. */
  stop(): Promise<number>;
  /** The process id. */
  pid: number;
}

/**
 * Start our server in the foreground on a fresh Unix socket and wait until
 * it accepts connections.
 *
 * @param args Plugin and parameters (and any options), e.g. `["memory", "size=1M"]`.
 * @param env Added to the client environment.
 * @param command The server: ours unless told (`["nbdkit"]` for the peer).
 */
export async function startTestServer(
  args: string[],
  env: Record<string, string> = {},
  command: string[] = ourCommand(),
): Promise<TestServer> {
  const { dir } = scratch();
  const socket = join(dir, "nbd.sock");
  const [cmd, ...pre] = command;
  const child = spawn(cmd, [...pre, "-f", "-U", socket, ...args], {
    env: { ...CLIENT_ENV, ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (d: string) => stderr += d);
  const exited = new Promise<number>((resolve) =>
    child.on("close", (code, signal) => resolve(code ?? (signal ? 128 + 15 : 1)))
  );
  let alive = true;
  exited.then(() => alive = false);
  const deadline = Date.now() + 30_000;
  while (!existsSync(socket)) {
    if (!alive) throw new Error(`server exited before listening: ${stderr}`);
    if (Date.now() > deadline) throw new Error(`server did not listen: ${stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    socket,
    uri: `nbd+unix:///?socket=${socket}`,
    pid: child.pid!,
    stderr: () => stderr,
    async waitForStderr(pattern: RegExp) {
      // The server logs after it closes the connection: the client may see the close first.
      for (let i = 0; i < 200 && !pattern.test(stderr); i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      return stderr;
    },
    async stop() {
      // process.kill, not child.kill: Deno then reports the exit code, not the signal sent.
      if (alive) process.kill(child.pid!, "SIGTERM");
      const status = await exited;
      rmSync(dir, { recursive: true, force: true });
      return status;
    },
  };
}

/**
 * The streaming plugin's smoke test: make `source`, `size` (a `head -c` count,
 * e.g. "8M") of random bytes, and the FIFO `fifo`, whose reader hashes what
 * comes; `serve(script)` runs a captive server writing into the FIFO, with
 * `script` (a qemu-img copying `source` to `$nbd`) as its `--run`. Asserts
 * that the server exits 0 and that the FIFO got exactly the bytes of `source`.
 */
export async function assertQemuImgWritesFifo(
  source: string,
  fifo: string,
  size: string,
  serve: (script: string) => Promise<Result>,
): Promise<void> {
  assert.equal(sh(`head -c ${size} /dev/urandom > ${shQuote(source)}`).status, 0);
  assert.equal(sh(`mkfifo ${shQuote(fifo)}`).status, 0);
  const expected = sh(`sha256sum < ${shQuote(source)}`).stdout.split(" ")[0];
  const reader = run(["/bin/sh", "-c", `sha256sum < ${shQuote(fifo)}`]);
  const r = await serve(`qemu-img convert -n -f raw ${shQuote(source)} -O raw "$nbd"`);
  const read = await reader;
  assert.equal(r.status, 0, r.stderr);
  assert.equal(read.stdout.split(" ")[0], expected);
}

/**
 * The libvirt plugin's smoke test: a libvirt guest with one 8 MiB disk, sda
 * (tests/libvirt_env.ts), removed after `body`, which gets the arguments that
 * serve that disk captive with `nbdcopy "$uri" - | sha256sum` as the `--run`
 * script, and the SHA-256 of the disk that the script must print.
 */
export async function withLibvirtSda(
  body: (args: string[], sha256: string) => Promise<void>,
): Promise<void> {
  const libvirt = await setupLibvirt({ bigSize: 8 * 1024 * 1024, extraDisks: false });
  try {
    const args = [
      "-U",
      "-",
      "libvirt",
      `domain=${libvirt.domain}`,
      "disk=sda",
      "--run",
      'nbdcopy "$uri" - | sha256sum',
    ];
    await body(args, libvirt.disk("sda").sha256);
  } finally {
    libvirt.cleanup();
  }
}
