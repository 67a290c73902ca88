/**
 * The streaming plugin under faults: whatever happens to the server or the
 * client, the bytes that come out of the pipe are exactly the bytes the
 * server acknowledged, in order.
 *
 * - SIGTERM while a client streams with many writes in flight: the writes
 *   in flight finish and are acknowledged, later ones get ESHUTDOWN, the
 *   pipe is drained before the server exits 0, and what the reader got is
 *   the acknowledged prefix, byte for byte.
 * - A client killed with SIGKILL in the middle of its writes: the pipe holds
 *   a prefix of what it sent, at least everything it saw acknowledged; the
 *   server stays up and stops cleanly afterwards.
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CLIENT_ENV, ourCommand, requireTool, run, scratch, shWaitFor } from "./helpers.ts";

const MiB = 1024 * 1024;
/** The client writes 64 chunks of 1 MiB. */
const CHUNKS = 64;
/** The SIGTERM test signals the server right after sending this request. */
const SIGNALLED_AT = 16;

/**
 * Chunk i: bytes (i + k) mod 256 for k = 0 … 255, repeated. Every chunk
 * differs from its neighbours, and a shift inside a chunk shows.
 */
function chunk(i: number): Uint8Array {
  const out = new Uint8Array(MiB);
  for (let j = 0; j < MiB; j++) out[j] = (i + j) & 255;
  return out;
}

/** The same chunks in Python. */
const PY_CHUNK = `def chunk(i):
    return bytes((i + k) & 255 for k in range(256)) * ${MiB / 256}
`;

interface Server {
  socket: string;
  pid: number;
  exited: Promise<number>;
  stderr(): string;
}

async function spawnStreaming(dir: string, out: string, extra: string[] = []): Promise<Server> {
  const socket = join(dir, "nbd.sock");
  const [cmd, ...pre] = ourCommand();
  const child = spawn(cmd, [...pre, "-f", "-U", socket, ...extra, "streaming", `write=${out}`], {
    env: CLIENT_ENV,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (d: string) => stderr += d);
  const exited = new Promise<number>((resolve) =>
    child.on("close", (code, signal) => resolve(code ?? (signal === "SIGKILL" ? 137 : 143)))
  );
  for (let i = 0; i < 600 && !existsSync(socket); i++) {
    await new Promise((r) => setTimeout(r, 50));
  }
  if (!existsSync(socket)) throw new Error(`server did not start: ${stderr}`);
  return { socket, pid: child.pid!, exited, stderr: () => stderr };
}

function sha(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** The concatenation of chunks 0 … n-1. */
function prefix(n: number): Uint8Array {
  const out = new Uint8Array(n * MiB);
  for (let i = 0; i < n; i++) out.set(chunk(i), i * MiB);
  return out;
}

/**
 * Where the stream goes: a regular file, or a FIFO (created by the server)
 * whose reader, `cat`, opens it only after a second — so that a stop has
 * acknowledged bytes to deliver after the signal. `done` resolves once the
 * output file is complete.
 */
function output(
  dir: string,
  kind: "a file" | "a FIFO whose reader comes late",
): Promise<{ out: string; target: string; done: Promise<unknown> }> {
  const out = join(dir, "out.raw");
  if (kind === "a file") {
    writeFileSync(out, "");
    return Promise.resolve({ out, target: out, done: Promise.resolve() });
  }
  const fifo = join(dir, "out.fifo");
  const done = run([
    "/bin/sh",
    "-c",
    `${shWaitFor(`-p ${fifo}`, 5)}; sleep 1; cat ${fifo} > ${out}`,
  ], { timeoutMs: 120_000 });
  return Promise.resolve({ out, target: fifo, done });
}

describe("streaming under faults", () => {
  before(() => requireTool("nbdsh"));

  for (const kind of ["a file", "a FIFO whose reader comes late"] as const) {
    test(`SIGTERM mid-stream into ${kind}: it gets exactly the acknowledged writes`, async () => {
      const { dir: d, cleanup: c } = scratch();
      try {
        const { out, target, done } = await output(d, kind);
        const server = await spawnStreaming(d, target);
        // Sequential 1 MiB writes, 8 in flight; SIGTERM once request SIGNALLED_AT is sent.
        const r = await run([
          "nbdsh",
          "-u",
          `nbd+unix:///?socket=${server.socket}`,
          "-c",
          `${PY_CHUNK}
import json, os, signal, time
chunks = [nbd.Buffer.from_bytearray(bytearray(chunk(i))) for i in range(${CHUNKS})]
status = {}
cookies = {}
def reap():
    for i, c in list(cookies.items()):
        try:
            if h.aio_command_completed(c):
                status[i] = 0
                del cookies[i]
        except nbd.Error as e:
            status[i] = e.errno
            del cookies[i]
sent = 0
try:
    for i in range(${CHUNKS}):
        while h.aio_in_flight() >= 8:
            h.poll(1)
            reap()
        cookies[i] = h.aio_pwrite(chunks[i], i * ${MiB})
        sent = i + 1
        if i == ${SIGNALLED_AT}:
            # aio_pwrite queues: its bytes go out as libnbd can send them. Sent
            # all, then signalled, so every write before the signal is in the socket.
            while not h.aio_is_ready():
                h.poll(1)
            os.kill(${server.pid}, signal.SIGTERM)
    while h.aio_in_flight() > 0:
        h.poll(1)
        reap()
except nbd.Error as e:
    pass
reap()
print(json.dumps({"sent": sent, "status": [status.get(i, "lost") for i in range(sent)]}))`,
        ], { timeoutMs: 120_000 });
        assert.equal(r.status, 0, r.stderr);
        const { status } = JSON.parse(r.stdout.trim().split("\n").pop()!) as {
          sent: number;
          status: (number | string)[];
        };
        assert.equal(await server.exited, 0, server.stderr());
        // With the FIFO, the signal came long before the reader opened (a second
        // later): everything it got was delivered after the signal.
        // Acknowledged: a prefix (the writes dispatched before the server acted
        // on the signal, which may be a few after it); then ESHUTDOWN. Every
        // request sent before the signal (0 … SIGNALLED_AT) is in the socket
        // when the server stops, so it is answered; one sent later may come
        // after the server stopped reading, and libnbd then fails it with
        // ENOTCONN or never reports it ("lost"), depending on timing; and once
        // the server has stopped reading, it answers nothing more.
        let n = 0;
        while (status[n] === 0) n++;
        const all = JSON.stringify(status);
        assert.ok(n >= 1 && n < status.length, all);
        let stoppedReading = false;
        for (const [i, s] of status.entries()) {
          if (i < n) continue;
          const unanswered = s === "ENOTCONN" || s === "lost";
          assert.ok(
            unanswered ? i > SIGNALLED_AT : s === "ESHUTDOWN" && !stoppedReading,
            `request ${i}: ${s} in ${all}`,
          );
          stoppedReading ||= unanswered;
        }
        await done;
        const got = readFileSync(out);
        assert.equal(
          got.length,
          n * MiB,
          `${got.length} bytes in the pipe for ${n} MiB acknowledged`,
        );
        assert.equal(sha(got), sha(prefix(n)));
      } finally {
        c();
      }
    });

    test(`a writer killed with SIGKILL, into ${kind}: a prefix of what it sent`, async () => {
      const { dir: d, cleanup: c } = scratch();
      try {
        const { out, target, done } = await output(d, kind);
        const server = await spawnStreaming(d, target);
        const child = spawn("nbdsh", [
          "-u",
          `nbd+unix:///?socket=${server.socket}`,
          "-c",
          `${PY_CHUNK}
import sys
chunks = [nbd.Buffer.from_bytearray(bytearray(chunk(i))) for i in range(${CHUNKS})]
done = 0
for i in range(${CHUNKS}):
    while h.aio_in_flight() >= 8:
        h.poll(1)
    h.aio_pwrite(chunks[i], i * ${MiB}, completion=lambda err, i=i: print("ack", i, err.value, flush=True) or 1)
    if i == 24:
        print("go", flush=True)
        while True:
            h.poll(1)`,
        ], { env: CLIENT_ENV, stdio: ["ignore", "pipe", "pipe"] });
        let stdout = "";
        child.stdout!.setEncoding("utf8");
        child.stdout!.on("data", (s: string) => stdout += s);
        const gone = new Promise((resolve) => child.on("close", resolve));
        for (let i = 0; i < 600 && !stdout.includes("go"); i++) {
          await new Promise((r) => setTimeout(r, 50));
        }
        assert.match(stdout, /go/, "the writer started");
        child.kill("SIGKILL");
        await gone;
        const acked = new Set(
          [...stdout.matchAll(/^ack (\d+) 0$/gm)].map((m) => Number(m[1])),
        );
        let n = 0;
        while (acked.has(n)) n++;
        // The server carries on: stop it cleanly, which drains the pipe.
        await new Promise((r) => setTimeout(r, 200));
        process.kill(server.pid, "SIGTERM");
        assert.equal(await server.exited, 0, server.stderr());
        await done;
        const size = statSync(out).size;
        assert.ok(
          size % MiB === 0 && size >= n * MiB && size <= 25 * MiB,
          `${size} bytes, ${n} MiB acknowledged`,
        );
        assert.equal(sha(readFileSync(out)), sha(prefix(size / MiB)));
      } finally {
        c();
      }
    });
  }
});
