/**
 * The runtime adapter of whichever runtime runs this file (Deno, Bun, Node):
 * sockets, files, FIFOs, child processes, as the rest of the code base uses
 * them through `runtime/mod.ts`.
 *
 * @module
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import { type Connection, runtime } from "../runtime/mod.ts";
import process from "node:process";
import { scratch, sh, shQuote } from "./helpers.ts";

/** Deterministic, non-repeating-looking bytes, so a lost or doubled chunk shows. */
function pattern(size: number, seed = 1): Uint8Array {
  const out = new Uint8Array(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Echo everything back until the peer stops sending, then close. */
async function echo(conn: Connection): Promise<void> {
  const reader = conn.readable.getReader();
  const writer = conn.writable.getWriter();
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      await writer.write(value);
    }
  } catch {
    // the peer reset: that ends the echo too
  } finally {
    conn.close();
  }
}

/** Write `data` in chunks of varying size (as the protocol layer would). */
async function writeChunked(writable: WritableStream<Uint8Array>, data: Uint8Array): Promise<void> {
  const writer = writable.getWriter();
  let off = 0;
  for (let i = 0; off < data.length; i++) {
    const n = Math.min(data.length - off, [28, 4096, 65536, 1 << 20, 7][i % 5]);
    await writer.write(data.subarray(off, off + n));
    off += n;
  }
  writer.releaseLock();
}

/** Read exactly `size` bytes with a BYOB reader (what the protocol layer may use). */
async function readExactly(
  readable: ReadableStream<Uint8Array>,
  size: number,
): Promise<Uint8Array> {
  const reader = readable.getReader({ mode: "byob" });
  const out = new Uint8Array(size);
  let off = 0;
  let buf = new Uint8Array(256 << 10);
  while (off < size) {
    const { value, done } = await reader.read(buf.subarray(0, Math.min(buf.length, size - off)));
    if (done) break;
    out.set(value, off);
    off += value.length;
    buf = new Uint8Array(value.buffer);
  }
  reader.releaseLock();
  assert.equal(off, size, "stream ended early");
  return out;
}

/** Read a stream to its end. */
async function readAll(readable: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  for await (const chunk of readable) {
    chunks.push(chunk);
    total += chunk.length;
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}

function assertSameBytes(actual: Uint8Array, expected: Uint8Array): void {
  assert.equal(actual.length, expected.length);
  const bad = actual.findIndex((b, i) => b !== expected[i]);
  assert.equal(bad, -1, `first differing byte at offset ${bad}`);
}

function tcpConnect(port: number, allowHalfOpen = false): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host: "127.0.0.1", port, allowHalfOpen });
    sock.once("error", reject);
    sock.once("connect", () => resolve(sock));
  });
}

/** A socket file nobody listens on, as a server that died leaves behind. */
function makeStaleSocket(path: string): void {
  const bind = "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])";
  const r = sh(`python3 -c ${shQuote(bind)} ${shQuote(path)}`);
  assert.equal(r.status, 0, r.stderr);
}

test("listenUnix + connectUnix echo 10 MiB exactly", { timeout: 60_000 }, async () => {
  const { dir, cleanup } = scratch();
  try {
    const path = `${dir}/sock`;
    makeStaleSocket(path);
    const served: Promise<void>[] = [];
    const listener = await runtime.listenUnix(path, (conn) => served.push(echo(conn)));
    assert.deepEqual(listener.address, { transport: "unix", path });
    const conn = await runtime.connectUnix(path);
    const data = pattern(10 << 20);
    const [, received] = await Promise.all([
      writeChunked(conn.writable, data),
      readExactly(conn.readable, data.length),
    ]);
    assertSameBytes(received, data);
    conn.close();
    await Promise.all(served);
    assert.equal(served.length, 1);
    listener.close();
  } finally {
    cleanup();
  }
});

// nbdkit answers a client that has shut down its sending half; so must we.
test("a client that half-closes still gets its reply", async () => {
  const listener = await runtime.listenTcp("127.0.0.1", 0, async (conn) => {
    const request = await readAll(conn.readable);
    const writer = conn.writable.getWriter();
    await writer.write(new TextEncoder().encode(`got ${request.length}`));
    conn.close();
  });
  const port = listener.address.transport === "tcp" ? listener.address.port : 0;
  const sock = await tcpConnect(port, true);
  const reply = new Promise<string>((resolve) => {
    let text = "";
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => text += d);
    sock.on("end", () => resolve(text));
  });
  sock.end(new Uint8Array(1000));
  assert.equal(await reply, "got 1000");
  sock.destroy();
  listener.close();
});

test("bytes whose writes resolved are delivered even when close() follows at once", async () => {
  const { dir, cleanup } = scratch();
  try {
    const path = `${dir}/sock`;
    const listener = await runtime.listenUnix(path, async (conn) => {
      const writer = conn.writable.getWriter();
      // Many small replies in one tick, as pipelined requests produce them.
      const writes = [];
      for (let i = 0; i < 1000; i++) writes.push(writer.write(pattern(16, i + 1)));
      await Promise.all(writes);
      conn.close();
    });
    const conn = await runtime.connectUnix(path);
    const received = await readAll(conn.readable);
    const expected = new Uint8Array(16_000);
    for (let i = 0; i < 1000; i++) expected.set(pattern(16, i + 1), i * 16);
    assertSameBytes(received, expected);
    conn.close();
    listener.close();
  } finally {
    cleanup();
  }
});

test("listenTcp on port 0 echoes", async () => {
  const served: Promise<void>[] = [];
  const listener = await runtime.listenTcp("127.0.0.1", 0, (conn) => served.push(echo(conn)));
  const address = listener.address;
  assert.equal(address.transport, "tcp");
  assert.ok(address.transport === "tcp" && address.port > 0);
  const sock = await tcpConnect(address.transport === "tcp" ? address.port : 0);
  const reply = new Promise<string>((resolve) => {
    let text = "";
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => {
      text += d;
      if (text.length >= 11) resolve(text);
    });
  });
  sock.write("hello world");
  assert.equal(await reply, "hello world");
  sock.end();
  await Promise.all(served);
  sock.destroy();
  listener.close();
});

test("a peer that resets ends or errors the readable, and nothing crashes", async () => {
  let serverSide!: (conn: Connection) => void;
  const accepted = new Promise<Connection>((resolve) => serverSide = resolve);
  const listener = await runtime.listenTcp("127.0.0.1", 0, serverSide);
  const port = listener.address.transport === "tcp" ? listener.address.port : 0;
  const sock = await tcpConnect(port);
  sock.on("error", () => {});
  sock.write("some bytes");
  const conn = await accepted;
  const reader = conn.readable.getReader();
  const first = await reader.read();
  assert.ok(first.value && first.value.length > 0);
  const reset = sock as Socket & { resetAndDestroy?: () => void };
  if (reset.resetAndDestroy) reset.resetAndDestroy();
  else sock.destroy();
  // Reads drain to an end or an error; either way, never hang or throw uncaught.
  while (true) {
    try {
      if ((await reader.read()).done) break;
    } catch {
      break;
    }
  }
  // Writing to the dead connection fails (or is silently dropped) — no crash.
  const writer = conn.writable.getWriter();
  try {
    for (let i = 0; i < 10; i++) await writer.write(new Uint8Array(65536));
  } catch {
    // expected
  }
  conn.close();
  listener.close();
});

test("openFile: pwrite, pread, size, sync", async () => {
  const { dir, cleanup } = scratch();
  try {
    const path = `${dir}/disk.img`;
    await runtime.writeTextFile(path, "");
    const file = await runtime.openFile(path, { write: true });
    assert.equal(file.kind, "file");
    const data = pattern(100_000, 7);
    // Requests in flight together, as NBD clients send them.
    await Promise.all([
      file.pwrite(data, 1 << 20),
      file.pwrite(data.subarray(0, 512), 0),
      file.pwrite(data.subarray(512, 1024), 4096),
    ]);
    await file.sync();
    assert.equal(await file.size(), (1 << 20) + data.length);
    const [a, b, c] = [new Uint8Array(data.length), new Uint8Array(512), new Uint8Array(512)];
    await Promise.all([file.pread(a, 1 << 20), file.pread(b, 0), file.pread(c, 4096)]);
    assertSameBytes(a, data);
    assertSameBytes(b, data.subarray(0, 512));
    assertSameBytes(c, data.subarray(512, 1024));
    // A hole reads as zeroes; the end of the file before the buffer is full
    // is an error (the file shrank under the server), not zeroes.
    const hole = new Uint8Array(1000).fill(9);
    await file.pread(hole, 8192);
    assert.ok(hole.every((x) => x === 0));
    const tail = new Uint8Array(1000).fill(9);
    await assert.rejects(
      Promise.resolve(file.pread(tail, (1 << 20) + data.length - 10)),
      (err: Error & { code?: string }) =>
        err.code === "EIO" && err.message === "unexpected end of file",
    );
    await file.close();

    const ro = await runtime.openFile(path, { write: false });
    await assert.rejects(ro.pwrite(new Uint8Array(1), 0));
    await ro.close();

    // A failing read names its cause (on Deno, through its own API: FFI's errno is not visible).
    const folder = await runtime.openFile(dir, { write: false });
    assert.equal(folder.kind, "directory");
    await assert.rejects(async () => await folder.pread(new Uint8Array(512), 0), /directory/i);
    await folder.close();
    const device = await runtime.openFile("/dev/null", { write: true });
    assert.equal(device.kind, "char");
    await device.close();
    // A FIFO is refused at once, whichever way it is opened: waiting for a
    // writer (read-only) would hang whoever asked.
    await runtime.mkfifo(`${dir}/fifo`);
    for (const write of [false, true]) {
      await assert.rejects(
        runtime.openFile(`${dir}/fifo`, { write }),
        (err: Error & { code?: string }) => err.code === "EINVAL" && /is a FIFO/.test(err.message),
      );
    }
  } finally {
    cleanup();
  }
});

/** Both ends of the FIFO at `path`, opened at once: neither open may block the event loop, or the other could never start. */
function openFifoEnds(
  path: string,
): Promise<[WritableStream<Uint8Array>, ReadableStream<Uint8Array>]> {
  return Promise.all([runtime.openWriteStream(path), runtime.openReadStream(path)]);
}

test(
  "mkfifo: 5 MiB through a FIFO, both ends opened concurrently",
  { timeout: 60_000 },
  async () => {
    const { dir, cleanup } = scratch();
    try {
      const path = `${dir}/fifo`;
      await runtime.mkfifo(path);
      assert.equal((await runtime.stat(path))?.kind, "fifo");
      await assert.rejects(runtime.mkfifo(path), /mkfifo/);
      const [writable, readable] = await openFifoEnds(path);
      const data = pattern(5 << 20, 3);
      const [, received] = await Promise.all([
        writeChunked(writable, data).then(() => writable.close()),
        readAll(readable),
      ]);
      assertSameBytes(received, data);
      assert.equal((await runtime.stat(path))?.kind, "fifo");
    } finally {
      cleanup();
    }
  },
);

test(
  "openReadStream of a FIFO: a slow BYOB reader with small buffers gets every byte, in order",
  { timeout: 60_000 },
  async () => {
    // The streaming plugin's read mode reads with BYOB; Node's FIFO stream copies
    // from one socket buffer into the reader's, pausing the socket while none waits.
    const { dir, cleanup } = scratch();
    try {
      const path = `${dir}/fifo`;
      await runtime.mkfifo(path);
      const [writable, readable] = await openFifoEnds(path);
      const data = pattern(12 << 20, 9);
      const reader = readable.getReader({ mode: "byob" });
      const received = new Uint8Array(data.length);
      let at = 0;
      const reading = (async () => {
        let buf = new Uint8Array(100_000); // smaller than a pipe's worth: reads leave a remainder
        for (let i = 0;; i++) {
          const { value, done } = await reader.read(buf);
          if (done) break;
          received.set(value, at);
          at += value.length;
          buf = new Uint8Array(value.buffer);
          if (i % 16 === 0) await new Promise((r) => setTimeout(r, 5)); // let the writer get ahead
        }
      })();
      await Promise.all([writeChunked(writable, data).then(() => writable.close()), reading]);
      assert.equal(at, data.length);
      assertSameBytes(received, data);
    } finally {
      cleanup();
    }
  },
);

/** The descriptors of this process open on `path`, each with whether it is nonblocking. */
function fdsOn(path: string): { fd: number; nonblocking: boolean }[] {
  const out = [];
  for (const name of readdirSync("/proc/self/fd")) {
    let target;
    try {
      target = readlinkSync(`/proc/self/fd/${name}`);
    } catch {
      continue; // closed meanwhile (readdir's own descriptor)
    }
    if (target !== path) continue;
    const flags = /^flags:\s*(\d+)/m.exec(readFileSync(`/proc/self/fdinfo/${name}`, "utf8"));
    out.push({ fd: Number(name), nonblocking: (parseInt(flags![1], 8) & 0o4000) !== 0 });
  }
  return out;
}

test(
  "openWriteStream on a FIFO: paced for a slow reader, every byte once, for a fast reader too",
  { timeout: 60_000 },
  async () => {
    const { dir, cleanup } = scratch();
    try {
      const path = `${dir}/fifo`;
      await runtime.mkfifo(path);
      // 64 KiB every 2 ms, far slower than the writer: the pipe fills and stays full.
      const slow = "import hashlib,sys,time\nh=hashlib.sha256()\n" +
        "while b:=sys.stdin.buffer.read1(65536): h.update(b); time.sleep(0.002)\nprint(h.hexdigest())";
      for (
        const [reader, size] of [[`python3 -c ${shQuote(slow)}`, 8 << 20], [
          "sha256sum",
          96 << 20,
        ]] as const
      ) {
        const child = spawn("/bin/sh", ["-c", `${reader} < ${shQuote(path)}`], {
          stdio: ["ignore", "pipe", "inherit"],
        });
        let out = "";
        child.stdout.on("data", (d) => out += d);
        const exited = new Promise((resolve) => child.on("close", resolve));
        const writable = await runtime.openWriteStream(path);
        // Two descriptors: a nonblocking one written while the reader is slow,
        // a blocking one for the thread that waits when it is fast.
        const fds = fdsOn(path);
        assert.deepEqual(
          fds.map((f) => f.nonblocking).sort(),
          [false, true],
          `${reader}: ${JSON.stringify(fds)}`,
        );
        const data = pattern(size, 9);
        await writeChunked(writable, data);
        await writable.close();
        assert.equal(await exited, 0);
        assert.deepEqual(fdsOn(path), [], "both closed");
        assert.equal(
          out.trim().split(" ")[0],
          createHash("sha256").update(data).digest("hex"),
          reader,
        );
      }
    } finally {
      cleanup();
    }
  },
);

test("openWriteStream truncates or creates a file; openReadStream reads it", async () => {
  const { dir, cleanup } = scratch();
  try {
    const path = `${dir}/out`;
    await runtime.writeTextFile(path, "x".repeat(10_000));
    const data = pattern(300_000, 5);
    const w = await runtime.openWriteStream(path);
    await writeChunked(w, data);
    await w.close();
    assertSameBytes(await readAll(await runtime.openReadStream(path)), data);
    const created = `${dir}/new`;
    const w2 = await runtime.openWriteStream(created);
    await writeChunked(w2, data.subarray(0, 10));
    await w2.close();
    assert.deepEqual(await runtime.stat(created), { kind: "file", size: 10 });
  } finally {
    cleanup();
  }
});

test("spawnShell: exit status, signals, kill, environment", async () => {
  assert.deepEqual(await runtime.spawnShell("exit 3").status, { code: 3, signal: null });
  assert.deepEqual(await runtime.spawnShell("exit 200").status, { code: 200, signal: null });
  assert.deepEqual(await runtime.spawnShell("kill -TERM $$").status, { code: null, signal: 15 });
  const sleeper = runtime.spawnShell("exec sleep 30");
  sleeper.kill("SIGINT");
  assert.deepEqual(await sleeper.status, { code: null, signal: 2 });
  sleeper.kill("SIGTERM"); // ended: nothing happens
  const quiet = runtime.spawnShell("exit 0", { stdin: "null", stdout: "stderr" });
  assert.deepEqual(await quiet.status, { code: 0, signal: null });
  const env = runtime.spawnShell('test "$NBDKIT_TS_TEST_VAR" = "a b" && test -n "$PATH"', {
    env: { NBDKIT_TS_TEST_VAR: "a b" },
  });
  assert.deepEqual(await env.status, { code: 0, signal: null });
});

test("stat kinds and directory listings", async () => {
  const { dir, cleanup } = scratch();
  try {
    await runtime.writeTextFile(`${dir}/file`, "hello");
    await runtime.mkfifo(`${dir}/fifo`);
    makeStaleSocket(`${dir}/sock`);
    assert.deepEqual(await runtime.stat(`${dir}/file`), { kind: "file", size: 5 });
    assert.equal((await runtime.stat(dir))?.kind, "directory");
    assert.deepEqual(await runtime.stat(`${dir}/fifo`), { kind: "fifo", size: 0 });
    assert.equal((await runtime.stat(`${dir}/sock`))?.kind, "socket");
    assert.equal((await runtime.stat("/dev/null"))?.kind, "char");
    assert.equal(await runtime.stat(`${dir}/missing`), null);
    assert.deepEqual((await runtime.readDir(dir)).sort(), ["fifo", "file", "sock"]);
    await assert.rejects(runtime.readDir(`${dir}/missing`));
    await runtime.removeFile(`${dir}/file`);
    await runtime.removeFile(`${dir}/file`);
    assert.equal(await runtime.stat(`${dir}/file`), null);
  } finally {
    cleanup();
  }
});

test("makeTempDir, writeTextFile, importModule, removeDir", async () => {
  const dir = await runtime.makeTempDir("nbdkit-ts-rt-");
  try {
    assert.equal((await runtime.stat(dir))?.kind, "directory");
    await runtime.writeTextFile(`${dir}/plugin.mjs`, "export default { name: 'probe' };\n");
    const mod = await runtime.importModule(`${dir}/plugin.mjs`);
    assert.deepEqual(mod.default, { name: "probe" });
    assert.equal(runtime.resolvePath("/a/b"), "/a/b");
    assert.ok(runtime.resolvePath("x").endsWith("/x"));
  } finally {
    await runtime.removeDir(dir);
  }
  assert.equal(await runtime.stat(dir), null);
});

test("selfCommand restarts this program", () => {
  const argv = runtime.selfCommand();
  assert.ok(argv.length >= 1);
  assert.equal(argv[0], runtime.name === "deno" ? argv[0] : process.execPath);
});
