/**
 * Load and faults: 64 clients at once, each writing and verifying its own
 * region of one memory export over several rounds (every request answered
 * exactly once, every byte read back as written); the same with 64 real
 * nbdsh processes; and clients killed with SIGKILL in the middle of writes
 * and reads while others go on verifying — the server serves them all, and
 * the sockets of the dead are closed.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdirSync } from "node:fs";
import { connect, type Socket } from "node:net";
import {
  CLIENT_ENV,
  nbdsh,
  requireTool,
  run,
  startTestServer,
  type TestServer,
} from "./helpers.ts";
import { alive, Rng } from "./_fuzz_helpers.ts";

const MiB = 1024 * 1024;
/** The export: sparse, so only what the tests write takes memory. */
const SIZE = 16 * 1024 * MiB;
const CLIENTS = 64;
/** Each client's region (client i owns [i * REGION, (i + 1) * REGION)). */
const REGION = MiB;
/** Requests each client pipelines per phase: the region in pieces. */
const PIECES = 16;
const ROUNDS = 4;

/**
 * A client that pipelines requests and matches replies by cookie, simple or
 * structured, in whatever order they come.
 */
class PipeClient {
  #socket: Socket;
  #chunks: Uint8Array[] = [];
  #length = 0;
  #ended = false;
  #wake: (() => void) | null = null;
  structured = false;

  private constructor(socket: Socket) {
    this.#socket = socket;
    socket.on("data", (d: Uint8Array) => {
      this.#chunks.push(d);
      this.#length += d.length;
      this.#poke();
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      this.#ended = true;
      this.#poke();
    });
  }

  #poke(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  static connect(path: string): Promise<PipeClient> {
    return new Promise((resolve, reject) => {
      const s = connect({ path }, () => resolve(new PipeClient(s)));
      s.once("error", reject);
    });
  }

  /** Exactly `n` bytes (copied out of the received chunks), or an error on close or timeout. */
  async read(n: number, deadline = Date.now() + 30_000): Promise<Uint8Array> {
    while (this.#length < n) {
      if (this.#ended) throw new Error(`connection closed waiting for ${n} bytes`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        setTimeout(resolve, 100);
      });
    }
    const out = new Uint8Array(n);
    let at = 0;
    while (at < n) {
      const head = this.#chunks[0];
      const take = Math.min(head.length, n - at);
      out.set(head.subarray(0, take), at);
      at += take;
      if (take === head.length) this.#chunks.shift();
      else this.#chunks[0] = head.subarray(take);
    }
    this.#length -= n;
    return out;
  }

  send(bytes: Uint8Array): void {
    this.#socket.write(bytes);
  }

  destroy(): void {
    this.#socket.destroy();
  }

  /** Fixed newstyle, NO_ZEROES, optionally structured replies, then GO on the default export. */
  async handshake(structured: boolean): Promise<void> {
    await this.read(18);
    const opts: Uint8Array[] = [u32(3)];
    if (structured) opts.push(option(8, new Uint8Array(0)));
    opts.push(option(7, cat(u32(0), u16(0))));
    this.send(cat(...opts));
    for (;;) {
      const h = view(await this.read(20));
      const type = h.getUint32(12);
      const len = h.getUint32(16);
      if (len) await this.read(len);
      if (type >= 0x80000000) throw new Error(`option refused: 0x${type.toString(16)}`);
      if (type !== 1) continue; // NBD_REP_INFO
      if (h.getUint32(8) === 8) {
        this.structured = true;
        continue;
      }
      return;
    }
  }

  /**
   * Simple replies to `expected` (cookie → READ length, or 0), each exactly
   * once: returns the data of READs by cookie, or throws naming what went wrong.
   */
  async replies(expected: Map<bigint, number>): Promise<Map<bigint, Uint8Array>> {
    const got = new Map<bigint, Uint8Array>();
    while (got.size < expected.size) {
      const magic = view(await this.read(4)).getUint32(0);
      if (magic === 0x67446698) {
        const h = view(await this.read(12));
        const error = h.getUint32(0);
        const cookie = h.getBigUint64(4);
        if (!expected.has(cookie) || got.has(cookie)) throw new Error(`unexpected reply ${cookie}`);
        if (error !== 0) throw new Error(`request ${cookie} failed: errno ${error}`);
        const n = expected.get(cookie)!;
        got.set(cookie, n > 0 ? await this.read(n) : new Uint8Array(0));
      } else if (magic === 0x668e33ef) {
        // Only errors come structured here (READs go through structuredReads).
        const h = view(await this.read(16));
        const type = h.getUint16(2);
        const cookie = h.getBigUint64(4);
        await this.read(h.getUint32(12));
        throw new Error(`request ${cookie}: structured reply of type ${type}`);
      } else {
        throw new Error(`bad reply magic 0x${magic.toString(16)}`);
      }
    }
    return got;
  }
}

function u16(n: number): Uint8Array {
  const b = new Uint8Array(2);
  view(b).setUint16(0, n);
  return b;
}
function u32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  view(b).setUint32(0, n);
  return b;
}
function u64(n: bigint): Uint8Array {
  const b = new Uint8Array(8);
  view(b).setBigUint64(0, n);
  return b;
}
function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
function option(code: number, data: Uint8Array): Uint8Array {
  return cat(u64(0x49484156454f5054n), u32(code), u32(data.length), data);
}
function request(type: number, cookie: bigint, offset: number, count: number): Uint8Array {
  return cat(u32(0x25609513), u16(0), u16(type), u64(cookie), u64(BigInt(offset)), u32(count));
}

/**
 * One client's work: `rounds` times, write its region in pipelined pieces
 * with fresh random bytes, then read it back in pipelined pieces and compare.
 * Structured READ chunks carry absolute offsets: the piece's offset is
 * subtracted to place the data.
 */
async function verifyRegion(
  socket: string,
  index: number,
  rounds: number,
  structured: boolean,
  stop: () => boolean = () => false,
): Promise<number> {
  const c = await PipeClient.connect(socket);
  try {
    await c.handshake(structured);
    const rng = new Rng(index * 7919 + 1);
    const base = index * REGION;
    const piece = REGION / PIECES;
    let done = 0;
    for (let round = 0; round < rounds && !stop(); round++) {
      const data = rng.bytes(REGION);
      const writes = new Map<bigint, number>();
      const out: Uint8Array[] = [];
      for (let p = 0; p < PIECES; p++) {
        const cookie = BigInt(round * 1000 + p);
        writes.set(cookie, 0);
        out.push(
          request(1, cookie, base + p * piece, piece),
          data.subarray(p * piece, (p + 1) * piece),
        );
      }
      c.send(cat(...out));
      await c.replies(writes);
      const reads = new Map<bigint, number>();
      const offsets = new Map<bigint, number>();
      const req: Uint8Array[] = [];
      for (let p = 0; p < PIECES; p++) {
        const cookie = BigInt(round * 1000 + 500 + p);
        reads.set(cookie, piece);
        offsets.set(cookie, base + p * piece);
        req.push(request(0, cookie, base + p * piece, piece));
      }
      c.send(cat(...req));
      const got = structured ? await structuredReads(c, reads, offsets) : await c.replies(reads);
      for (let p = 0; p < PIECES; p++) {
        const back = got.get(BigInt(round * 1000 + 500 + p))!;
        const want = data.subarray(p * piece, (p + 1) * piece);
        if (!back || back.length !== want.length || !back.every((b, i) => b === want[i])) {
          throw new Error(`client ${index}, round ${round}: piece ${p} reads back wrong`);
        }
      }
      done++;
    }
    return done;
  } finally {
    c.destroy();
  }
}

/** READ replies with structured replies negotiated: chunks placed by offset. */
async function structuredReads(
  c: PipeClient,
  reads: Map<bigint, number>,
  offsets: Map<bigint, number>,
): Promise<Map<bigint, Uint8Array>> {
  const got = new Map<bigint, Uint8Array>();
  const bufs = new Map<bigint, Uint8Array>();
  const filled = new Map<bigint, number>();
  while (got.size < reads.size) {
    const h = view(await c.read(20));
    if (h.getUint32(0) !== 0x668e33ef) throw new Error("expected a structured reply");
    const flags = h.getUint16(4);
    const type = h.getUint16(6);
    const cookie = h.getBigUint64(8);
    const body = await c.read(h.getUint32(16));
    if (!reads.has(cookie) || got.has(cookie)) throw new Error(`unexpected chunk ${cookie}`);
    const buf = bufs.get(cookie) ?? new Uint8Array(reads.get(cookie)!);
    bufs.set(cookie, buf);
    if (type === 1) {
      const at = Number(view(body).getBigUint64(0)) - offsets.get(cookie)!;
      buf.set(body.subarray(8), at);
      filled.set(cookie, (filled.get(cookie) ?? 0) + body.length - 8);
    } else if (type === 2) {
      filled.set(cookie, (filled.get(cookie) ?? 0) + view(body).getUint32(8)); // a hole: zeroes
    } else if (type !== 0) {
      throw new Error(`request ${cookie} failed: chunk type ${type}`);
    }
    if (flags & 1) {
      if (filled.get(cookie) !== buf.length) throw new Error(`request ${cookie}: short read`);
      got.set(cookie, buf);
    }
  }
  return got;
}

/** Open file descriptors of a process. */
function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

describe("load", () => {
  let server: TestServer;

  before(async () => {
    requireTool("nbdsh");
    requireTool("nbdcopy");
    server = await startTestServer(["memory", `size=${SIZE}`]);
  });

  after(async () => {
    assert.equal(await server.stop(), 0);
  });

  test(`${CLIENTS} clients at once, each verifying its own region, ${ROUNDS} rounds`, async () => {
    const started = Date.now();
    const rounds = await Promise.all(
      Array.from(
        { length: CLIENTS },
        (_, i) => verifyRegion(server.socket, i, ROUNDS, i % 2 === 1),
      ),
    );
    assert.deepEqual(rounds, new Array(CLIENTS).fill(ROUNDS));
    console.log(
      `${CLIENTS} clients × ${ROUNDS} rounds × ${2 * REGION / MiB} MiB in ${
        Date.now() - started
      } ms`,
    );
  });

  test(`${CLIENTS} nbdsh processes at once, each verifying its own region`, async () => {
    const script = (i: number) =>
      `import os
base = ${(CLIENTS + i) * REGION}
for rnd in range(3):
    data = os.urandom(${REGION})
    piece = ${REGION / 8}
    bufs = [nbd.Buffer.from_bytearray(bytearray(data[p * piece:(p + 1) * piece])) for p in range(8)]
    cookies = [h.aio_pwrite(bufs[p], base + p * piece) for p in range(8)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    back = [nbd.Buffer(piece) for p in range(8)]
    cookies = [h.aio_pread(back[p], base + p * piece) for p in range(8)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    assert b"".join(bytes(b.to_bytearray()) for b in back) == data, "round %d" % rnd
print("ok")`;
    const results = await Promise.all(
      Array.from(
        { length: CLIENTS },
        (_, i) => run(["nbdsh", "-u", server.uri, "-c", script(i)], { timeoutMs: 120_000 }),
      ),
    );
    for (const [i, r] of results.entries()) {
      assert.equal(r.stdout.trim(), "ok", `nbdsh ${i}: ${r.stderr}`);
    }
  });

  test("clients killed with SIGKILL mid-write and mid-read; the others carry on", async () => {
    const fdsBefore = fdCount(server.pid);
    // Six clients verify their regions, round after round, while others are killed.
    let stop = false;
    const verifiers = Array.from(
      { length: 6 },
      (_, i) => verifyRegion(server.socket, 2 * CLIENTS + i, 1000, i % 2 === 0, () => stop),
    );

    // Victims write to or read from their own part of the upper half of the export.
    const writer = (i: number) =>
      `import os
print("go", flush=True)
base = ${512 * MiB + i * 16 * MiB}
data = nbd.Buffer.from_bytearray(bytearray(os.urandom(${MiB})))
while True:
    for k in range(8):
        h.aio_pwrite(data, base + (k % 16) * ${MiB})
    while h.aio_in_flight() > 0:
        h.poll(-1)`;
    const reader = (i: number) =>
      `print("go", flush=True)
base = ${512 * MiB + i * 16 * MiB}
bufs = [nbd.Buffer(${4 * MiB}) for k in range(8)]
while True:
    for k in range(8):
        h.aio_pread(bufs[k], base + (k % 4) * ${4 * MiB})
    while h.aio_in_flight() > 0:
        h.poll(-1)`;
    const rng = new Rng(20261121);
    const kinds = ["write", "read", "copy"] as const;
    const killed: string[] = [];
    for (let i = 0; i < 12; i++) {
      const kind = kinds[i % 3];
      const argv = kind === "copy"
        ? ["nbdcopy", "--no-extents", server.uri, "null:"]
        : ["nbdsh", "-u", server.uri, "-c", kind === "write" ? writer(i) : reader(i)];
      const child = spawn(argv[0], argv.slice(1), {
        env: CLIENT_ENV,
        stdio: ["ignore", "pipe", "pipe"],
      });
      const exited = new Promise<string>((resolve) =>
        child.on("close", (code, signal) => resolve(signal ?? `exit ${code}`))
      );
      // The nbdsh victims say when they are connected; nbdcopy needs a moment.
      await new Promise<void>((resolve) => {
        if (kind === "copy") setTimeout(resolve, 150);
        else child.stdout!.once("data", () => resolve());
        child.once("close", () => resolve());
      });
      await new Promise((r) => setTimeout(r, 50 + rng.below(400)));
      child.kill("SIGKILL");
      killed.push(`${kind}: ${await exited}`);
    }
    // Every victim died of the signal, in the middle of its work.
    assert.deepEqual(killed, Array.from({ length: 12 }, (_, i) => `${kinds[i % 3]}: SIGKILL`));

    stop = true;
    const rounds = await Promise.all(verifiers);
    for (const n of rounds) assert.ok(n > 0, `a verifier completed ${n} rounds`);
    assert.ok(alive(server.pid));

    // The dead clients' connections are closed: the server is back to its descriptors.
    let fds = fdCount(server.pid);
    for (let i = 0; i < 100 && fds > fdsBefore; i++) {
      await new Promise((r) => setTimeout(r, 50));
      fds = fdCount(server.pid);
    }
    assert.ok(fds <= fdsBefore, `${fds} descriptors open, ${fdsBefore} before`);

    const r = nbdsh(
      server.uri,
      `import os\ndata = os.urandom(65536)\nh.pwrite(data, 0)\nassert h.pread(65536, 0) == data\nprint("ok")`,
    );
    assert.equal(r.stdout.trim(), "ok", r.stderr);
  });
});
