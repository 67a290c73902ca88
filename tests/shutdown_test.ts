/**
 * Stopping cleanly, and plugins that fail badly.
 *
 * SIGTERM and SIGINT: the server stops accepting; requests already read and
 * dispatched ("in flight") finish and are answered normally; every request
 * read after the signal — including those the client had sent but the
 * server had not read yet — is answered with ESHUTDOWN rather than lost; a
 * little after its last request in flight finished (SHUTDOWN_LINGER_MS) the
 * connection is closed; then the plugin is unloaded, the Unix socket and the
 * pidfile are removed, and the exit status is 0. nbdkit 1.32, by contrast,
 * resets connections with requests still queued (their replies are lost).
 *
 * Plugin exceptions of any kind (strings, undefined, null, numbers, symbols,
 * objects without a prototype, Proxies whose traps throw; thrown or
 * rejected) become EIO for that request only.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CLIENT_ENV, ourCommand, requireTool, run, scratch, withScratch } from "./helpers.ts";
import { RawClient } from "./raw_client.ts";
import {
  CHAOS_PLUGIN,
  floodWithoutReading,
  generate,
  runCase,
  type Target,
  Violation,
} from "./_fuzz_helpers.ts";
import { ERRNO_VALUES, errnoOf, messageOf, NbdError } from "../plugins/errors.ts";

const safeErrno = (err: unknown) => ERRNO_VALUES[errnoOf(err)];

/** A RAM disk whose reads and writes take `delay=` ms, logging its lifecycle to `log=`. */
const SLOW_PLUGIN = `import { appendFileSync } from "node:fs";
let delay = 1000;
let log = null;
const disk = new Uint8Array(1 << 20);
for (let i = 0; i < disk.length; i++) disk[i] = i % 251;
const note = (line) => log && appendFileSync(log, line + "\\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export default {
  name: "slow",
  config(key, value) {
    if (key === "delay") delay = Number(value);
    else if (key === "log") log = value;
    else throw new Error("unknown parameter '" + key + "'");
  },
  open: () => ({}),
  close: () => note("close"),
  unload: () => note("unload"),
  getSize: () => disk.length,
  async pread(_h, buf, offset) {
    await sleep(delay);
    buf.set(disk.subarray(offset, offset + buf.length));
  },
  async pwrite(_h, buf, offset) {
    await sleep(delay);
    disk.set(buf, offset);
    note("pwrite " + offset);
  },
};
`;

/**
 * Every callback fails in its own way: reads and writes by offset (block k
 * of 1024 bytes throws value k; its second half rejects with it instead),
 * the others always; `open` and `getSize` for some export names.
 */
const THROWING_PLUGIN = `const disk = new Uint8Array(1 << 20);
export const values = [
  () => "a string",
  () => undefined,
  () => null,
  () => 42,
  () => Symbol("thrown"),
  () => ({ message: "an object" }),
  () => Object.create(null),
  () => new Proxy({}, { get() { throw new Error("trap"); }, getPrototypeOf() { throw new Error("trap"); } }),
  () => new Error("line one\\nline two"),
  () => Object.assign(new Error("odd errno"), { name: "NbdError", errno: "constructor" }),
  () => Object.assign(new Error("the disk is full"), { name: "NbdError", errno: "ENOSPC" }),
];
function fail(offset) {
  const k = Math.floor(offset / 1024);
  if (k >= values.length) return;
  if (offset % 1024 === 0) throw values[k]();
  return Promise.reject(values[k]());
}
export default {
  name: "throwing",
  open({ exportName }) {
    if (exportName === "bad-open") throw Object.create(null);
    return { exportName };
  },
  close() {
    throw Object.create(null);
  },
  getSize(h) {
    if (h.exportName === "bad-size") throw "no size today";
    return disk.length;
  },
  pread(_h, buf, offset) {
    return fail(offset) ?? void buf.set(disk.subarray(offset, offset + buf.length));
  },
  pwrite(_h, buf, offset) {
    return fail(offset) ?? void disk.set(buf, offset);
  },
  flush() {
    throw "flush failed";
  },
  trim() {
    return Promise.reject(undefined);
  },
  zero() {
    throw Object.create(null);
  },
  canCache: () => "native",
  cache() {
    throw new Proxy({}, { getPrototypeOf() { throw new Error("trap"); } });
  },
  extents(_h, count, offset, _flags, sink) {
    if (offset === 0) {
      sink.add(0, Number.NaN, 0); // nonsense: the server must answer EIO
      return;
    }
    throw null;
  },
};
`;

/** A server we start (and signal) ourselves. */
interface Spawned {
  socket: string;
  pidfile: string;
  uri: string;
  pid: number;
  stderr(): string;
  /** Exit status, or 128 + signal number; resolves when the process is gone. */
  exited: Promise<number>;
}

async function spawnServer(dir: string, args: string[]): Promise<Spawned> {
  const socket = join(dir, "nbd.sock");
  const pidfile = join(dir, "nbd.pid");
  const [cmd, ...pre] = ourCommand();
  const child = spawn(cmd, [...pre, "-f", "-U", socket, "-P", pidfile, ...args], {
    env: CLIENT_ENV,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (d: string) => stderr += d);
  const signals: Record<string, number> = { SIGINT: 2, SIGKILL: 9, SIGTERM: 15 };
  const exited = new Promise<number>((resolve) =>
    child.on("close", (code, signal) => resolve(code ?? 128 + (signals[signal ?? ""] ?? 0)))
  );
  let gone = false;
  exited.then(() => gone = true);
  for (let i = 0; i < 600 && !existsSync(pidfile); i++) {
    if (gone) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!existsSync(pidfile)) throw new Error(`server did not start: ${stderr}`);
  return {
    socket,
    pidfile,
    uri: `nbd+unix:///?socket=${socket}`,
    pid: child.pid!,
    stderr: () => stderr,
    exited,
  };
}

/**
 * Python (Debian's, with the nbd module) that queues `early` reads of 4 KiB,
 * sends SIGNAL to the server once they are in flight, queues `late` reads
 * once the server has begun to stop, and prints how each ended (0 or the
 * errno's name) and whether the early data is right.
 */
function inFlightProbe(
  server: { pid: number; socket: string },
  signal: string,
  early: number,
  late: number,
): string {
  // The stop has begun once the listener is closed (the server marks itself
  // stopping in the same step): a connection refused shows it, where a fixed
  // sleep would not on a loaded machine.
  return `import json, os, signal, socket, time
bufs = [nbd.Buffer(4096) for i in range(${early})]
early = [h.aio_pread(bufs[i], i * 4096) for i in range(${early})]
time.sleep(0.3)
os.kill(${server.pid}, signal.${signal})
deadline = time.time() + 10
while time.time() < deadline:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(${JSON.stringify(server.socket)})
    except (ConnectionRefusedError, FileNotFoundError):
        break
    finally:
        probe.close()
    time.sleep(0.01)
late = [h.aio_pread(nbd.Buffer(512), 0) for i in range(${late})]
end = time.time() + 20
problem = None
while h.aio_in_flight() > 0 and time.time() < end:
    try:
        h.poll(1)
    except nbd.Error as e:
        problem = str(e)
        break
def status(c):
    try:
        h.aio_command_completed(c)
        return 0
    except nbd.Error as e:
        return e.errno
expected = [bytes((i * 4096 + j) % 251 for j in range(4096)) for i in range(${early})]
print(json.dumps({
    "early": [status(c) for c in early],
    "late": [status(c) for c in late],
    "data": [bytes(bufs[i].to_bytearray()) == expected[i] for i in range(${early})],
    "lost": h.aio_in_flight(),
    "problem": problem,
}))`;
}

function nbdshJson(uri: string, python: string): Promise<Record<string, unknown>> {
  return run(["nbdsh", "-u", uri, "-c", python], { timeoutMs: 60_000 }).then((r) => {
    assert.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout.trim().split("\n").pop()!);
  });
}

/** Python for nbdsh: `errno(f)` calls `f`, and gives 0 or the name of the errno it failed with. */
const PY_ERRNO = `def errno(f):
    try:
        f()
        return 0
    except nbd.Error as e:
        return e.errno`;

/**
 * Every line the server printed is one of its own log lines, or the notice
 * it gives when a stop takes over two seconds (a loaded machine): no stack
 * trace.
 */
function assertCleanStderr(stderr: string): void {
  for (const line of stderr.split("\n")) {
    if (line === "" || /^nbdkit-ts: SIG[A-Z]+: waiting for .+ again exits at once$/.test(line)) {
      continue;
    }
    assert.match(line, /^nbdkit-ts: (\w+\[\d+\]: )?(error|debug): \S/, line);
  }
}

describe("SIGTERM and SIGINT", () => {
  let dir: string;
  let cleanup: () => void;
  let plugin: string;

  before(() => {
    requireTool("nbdsh");
    ({ dir, cleanup } = scratch());
    plugin = join(dir, "slow.js");
    writeFileSync(plugin, SLOW_PLUGIN);
  });

  after(() => cleanup());

  for (const signal of ["SIGTERM", "SIGINT"]) {
    test(`${signal}: requests in flight finish, later ones get ESHUTDOWN, exit 0`, async () => {
      await withScratch(async (d) => {
        const server = await spawnServer(d, [plugin, "delay=1000"]);
        const r = await nbdshJson(server.uri, inFlightProbe(server, signal, 4, 3));
        assert.deepEqual(r.early, [0, 0, 0, 0]);
        assert.deepEqual(r.data, [true, true, true, true]);
        assert.deepEqual(r.late, ["ESHUTDOWN", "ESHUTDOWN", "ESHUTDOWN"]);
        assert.equal(r.lost, 0);
        assert.equal(await server.exited, 0);
        assert.equal(existsSync(server.socket), false, "the Unix socket is removed");
        assert.equal(existsSync(server.pidfile), false, "the pidfile is removed");
        assertCleanStderr(server.stderr());
      });
    });
  }

  test("requests sent but not yet read when the signal comes get ESHUTDOWN, none is lost", async () => {
    // -t 1: the server reads one request at a time, so five of the six are
    // still queued (in the socket, or read and waiting) when SIGTERM comes.
    await withScratch(async (d) => {
      const server = await spawnServer(d, ["-t", "1", plugin, "delay=700"]);
      const r = await nbdshJson(server.uri, inFlightProbe(server, "SIGTERM", 6, 2));
      assert.deepEqual(r.early, [
        0,
        "ESHUTDOWN",
        "ESHUTDOWN",
        "ESHUTDOWN",
        "ESHUTDOWN",
        "ESHUTDOWN",
      ]);
      assert.equal((r.data as boolean[])[0], true);
      assert.deepEqual(r.late, ["ESHUTDOWN", "ESHUTDOWN"]);
      assert.equal(r.lost, 0);
      assert.equal(await server.exited, 0);
    });
  });

  test("writes in flight are done before the plugin is closed and unloaded", async () => {
    await withScratch(async (d) => {
      const log = join(d, "plugin.log");
      const server = await spawnServer(d, [plugin, "delay=800", `log=${log}`]);
      const r = await nbdshJson(
        server.uri,
        `import json, os, signal, time
data = nbd.Buffer.from_bytearray(bytearray(b"w" * 4096))
cookies = [h.aio_pwrite(data, i * 4096) for i in range(3)]
time.sleep(0.3)
os.kill(${server.pid}, signal.SIGTERM)
while h.aio_in_flight() > 0:
    h.poll(1)
print(json.dumps({"done": [h.aio_command_completed(c) for c in cookies]}))`,
      );
      assert.deepEqual(r.done, [true, true, true]);
      assert.equal(await server.exited, 0);
      const lines = readFileSync(log, "utf8").trim().split("\n");
      assert.deepEqual(lines.slice(3), ["close", "unload"]);
      assert.deepEqual(lines.slice(0, 3).sort(), ["pwrite 0", "pwrite 4096", "pwrite 8192"]);
    });
  });

  test("idle clients and clients in the handshake are let go at once", async () => {
    await withScratch(async (d) => {
      const server = await spawnServer(d, [plugin, "delay=0"]);
      const idle = await RawClient.connect(server.socket);
      await idle.go();
      const greeting = await RawClient.connect(server.socket);
      await greeting.read(18); // and nothing more
      const started = Date.now();
      process.kill(server.pid, "SIGTERM");
      assert.equal(await idle.closedWithin(5000), true);
      assert.equal(await greeting.closedWithin(5000), true);
      assert.equal(await server.exited, 0);
      const took = Date.now() - started;
      assert.ok(took < 3000, `took ${took} ms`);
      assert.equal(existsSync(server.socket), false);
      // Letting go of the idle one is no error (it once logged a detached ArrayBuffer).
      assert.doesNotMatch(server.stderr(), /error/);
    });
  });

  test("a client that stopped reading its replies does not hold the shutdown up", async () => {
    await withScratch(async (d) => {
      const server = await spawnServer(d, [plugin, "delay=0"]);
      const { socket } = await floodWithoutReading(server.socket, 65536, 1000);
      const started = Date.now();
      process.kill(server.pid, "SIGTERM");
      // Its replies cannot be written: after SHUTDOWN_WRITE_STALL_MS without
      // progress the server hangs up on it, and exits.
      assert.equal(await server.exited, 0);
      const took = Date.now() - started;
      socket.destroy();
      assert.ok(took < 15_000, `took ${took} ms`);
      assert.equal(existsSync(server.socket), false);
    });
  });

  test("SIGTERM under fuzzing load: exit 0 at once, no malformed reply", async () => {
    await withScratch(async (d) => {
      writeFileSync(join(d, "chaos.js"), CHAOS_PLUGIN);
      const size = 4 * 1024 * 1024;
      const target: Target = { size, readonly: false, failFrom: size - 65536, stopping: true };
      const server = await spawnServer(d, [
        join(d, "chaos.js"),
        `size=${size}`,
        `failFrom=${size - 65536}`,
      ]);
      let stop = false;
      let cases = 0;
      const wrong: string[] = [];
      const worker = async (first: number) => {
        for (let seed = first; !stop; seed++) {
          try {
            await runCase(server.socket, generate(seed, target), target);
            cases++;
          } catch (err) {
            // Replies cut short by the end of the connection are the shutdown's
            // right (the server stopped reading); anything malformed is not.
            if (err instanceof Violation && !/replies after/.test(err.message)) {
              wrong.push(`${seed}: ${err.message}`);
            }
            await new Promise((r) => setTimeout(r, 1)); // refused: let timers run
          }
        }
      };
      const workers = Array.from({ length: 8 }, (_, i) => worker(3_000_001 + i * 100_000));
      // Enough cases first, however slow the machine: the stop must come under load.
      for (let i = 0; i < 600 && cases < 100; i++) await new Promise((r) => setTimeout(r, 100));
      const started = Date.now();
      process.kill(server.pid, "SIGTERM");
      const status = await server.exited;
      const took = Date.now() - started;
      stop = true;
      await Promise.all(workers);
      assert.equal(status, 0);
      assert.ok(took < 5000, `took ${took} ms`);
      assert.ok(cases >= 100, `only ${cases} cases ran`);
      assert.deepEqual(wrong, []);
      assert.equal(existsSync(server.socket), false);
      assert.equal(existsSync(server.pidfile), false);
      assertCleanStderr(server.stderr());
    });
  });

  test("no new connection is accepted while the last requests finish", async () => {
    await withScratch(async (d) => {
      // Margins for a loaded machine: the request is in flight well before
      // the signal, and the signal handled well before the late connection,
      // which still comes while the request runs.
      const server = await spawnServer(d, [plugin, "delay=3000"]);
      const busy = await RawClient.connect(server.socket);
      await busy.go();
      busy.request(0, 0n, 512, { cookie: 1n });
      await new Promise((r) => setTimeout(r, 500));
      process.kill(server.pid, "SIGTERM");
      await new Promise((r) => setTimeout(r, 1000));
      await assert.rejects(async () => {
        const late = await RawClient.connect(server.socket);
        // Accepted by the kernel before the listener closed: the server must hang up.
        const greeting = await late.read(18, 3000);
        if (greeting === null) throw new Error("closed without a greeting");
      });
      const reply = await busy.simpleReply(512);
      assert.equal(reply?.error, 0);
      assert.equal(reply?.cookie, 1n);
      assert.equal(await server.exited, 0);
    });
  });
});

describe("plugin exceptions", () => {
  let dir: string;
  let cleanup: () => void;
  let server: Spawned;

  before(async () => {
    requireTool("nbdsh");
    ({ dir, cleanup } = scratch());
    writeFileSync(join(dir, "throwing.js"), THROWING_PLUGIN);
    server = await spawnServer(dir, [join(dir, "throwing.js")]);
  });

  after(async () => {
    process.kill(server.pid, "SIGTERM");
    assert.equal(await server.exited, 0);
    assertCleanStderr(server.stderr());
    cleanup();
  });

  test("anything thrown or rejected by pread or pwrite is EIO for that request only", async () => {
    const r = await nbdshJson(
      server.uri,
      `import json
${PY_ERRNO}
out = {"read": [], "write": [], "after": []}
for k in range(11):
    for half in (0, 512):
        out["read"].append(errno(lambda: h.pread(512, k * 1024 + half)))
        out["write"].append(errno(lambda: h.pwrite(b"x" * 512, k * 1024 + half)))
        # The same connection goes on: a good read right after each failure.
        out["after"].append(errno(lambda: h.pread(512, 65536)))
print(json.dumps(out))`,
    );
    const expected = [...new Array(20).fill("EIO"), "ENOSPC", "ENOSPC"];
    assert.deepEqual(r.read, expected);
    assert.deepEqual(r.write, expected);
    assert.deepEqual(r.after, new Array(22).fill(0));
    const log = server.stderr();
    assert.match(log, /throwing\[\d+\]: error: NBD_CMD_READ: a string\n/);
    assert.match(log, /error: NBD_CMD_READ: undefined\n/);
    assert.match(log, /error: NBD_CMD_READ: Symbol\(thrown\)\n/);
    assert.match(log, /error: NBD_CMD_READ: line one line two\n/);
    assert.match(log, /error: NBD_CMD_READ: the plugin threw a value that cannot be printed\n/);
    assert.match(log, /error: NBD_CMD_WRITE: the disk is full\n/);
  });

  test("flush, trim, zero, cache and extents failing, and nonsense extents, are EIO", async () => {
    const r = await run([
      "nbdsh",
      "-c",
      `import json
h.add_meta_context("base:allocation")
h.connect_uri(${JSON.stringify(server.uri)})
${PY_ERRNO}
print(json.dumps([
    errno(lambda: h.flush()),
    errno(lambda: h.trim(4096, 0)),
    errno(lambda: h.zero(4096, 0)),
    errno(lambda: h.cache(4096, 0)),
    errno(lambda: h.block_status(4096, 0, lambda *a: 0)),
    errno(lambda: h.block_status(4096, 4096, lambda *a: 0)),
    errno(lambda: h.pread(512, 65536)),
]))`,
    ], { timeoutMs: 60_000 });
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), ["EIO", "EIO", "EIO", "EIO", "EIO", "EIO", 0]);
    assert.match(server.stderr(), /extent that is not integers/);
  });

  test("open, getSize and close failing end that connection only", async () => {
    for (const name of ["bad-open", "bad-size"]) {
      const r = await run(["nbdinfo", `nbd+unix:///${name}?socket=${server.socket}`]);
      assert.notEqual(r.status, 0);
    }
    const r = await nbdshJson(
      server.uri,
      `import json\nprint(json.dumps({"n": len(h.pread(512, 65536))}))`,
    );
    assert.equal(r.n, 512);
    assert.match(server.stderr(), /error: close: the plugin threw a value that cannot be printed/);
  });

  test("errnoOf and messageOf never throw and never say success", () => {
    assert.equal(safeErrno(new NbdError("ENOSPC", "full")), 28);
    assert.equal(safeErrno(new NbdError("EFOO" as never, "made up")), 5);
    assert.equal(safeErrno(new NbdError("constructor" as never, "made up")), 5);
    assert.equal(safeErrno(Object.create(null)), 5);
    assert.equal(
      safeErrno(
        new Proxy({}, {
          getPrototypeOf: () => {
            throw new Error();
          },
        }),
      ),
      5,
    );
    assert.equal(
      messageOf(Object.create(null)),
      "the plugin threw a value that cannot be printed",
    );
    assert.equal(messageOf("a\nb"), "a b");
  });
});
