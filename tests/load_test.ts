/**
 * Load and faults: 64 clients at once, each writing and verifying its own
 * region of one memory export over several rounds (every request answered
 * exactly once, every byte read back as written); the same with 64 real
 * nbdsh processes; clients that reset the connection with replies in flight;
 * and clients killed with SIGKILL in the middle of writes and reads while
 * others go on verifying — the server serves them all, logs no error for
 * those that go away, and the sockets of the dead are closed.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdirSync } from "node:fs";
import {
  CLIENT_ENV,
  nbdsh,
  requireTool,
  run,
  startTestServer,
  type TestServer,
} from "./helpers.ts";
import { alive, Rng } from "./_fuzz_helpers.ts";
import {
  CMD,
  concat,
  OPT,
  optionBytes,
  RawClient,
  requestBytes,
  u16,
  u32,
  view,
} from "./raw_client.ts";

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
class PipeClient extends RawClient {
  structured = false;

  static override async connect(path: string): Promise<PipeClient> {
    return new PipeClient(await RawClient.open(path));
  }

  /** Exactly `n` bytes, or an error on close or timeout. */
  override async read(n: number, ms = 30_000): Promise<Uint8Array> {
    const b = await super.read(n, ms);
    if (!b) throw new Error(`connection closed waiting for ${n} bytes`);
    return b;
  }

  /** Fixed newstyle, NO_ZEROES, optionally structured replies, then GO on the default export. */
  async handshake(structured: boolean): Promise<void> {
    await this.greet(3);
    const go = optionBytes(OPT.GO, concat(u32(0), u16(0)));
    this.send(structured ? concat(optionBytes(OPT.STRUCTURED_REPLY), go) : go);
    for (;;) {
      const r = (await this.optionReply())!;
      if (r.type >= 0x80000000) throw new Error(`option refused: 0x${r.type.toString(16)}`);
      if (r.type !== 1) continue; // NBD_REP_INFO
      if (r.option === OPT.STRUCTURED_REPLY) {
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
          requestBytes(CMD.WRITE, BigInt(base + p * piece), piece, { cookie }),
          data.subarray(p * piece, (p + 1) * piece),
        );
      }
      c.send(concat(...out));
      await c.replies(writes);
      const reads = new Map<bigint, number>();
      const offsets = new Map<bigint, number>();
      const req: Uint8Array[] = [];
      for (let p = 0; p < PIECES; p++) {
        const cookie = BigInt(round * 1000 + 500 + p);
        reads.set(cookie, piece);
        offsets.set(cookie, base + p * piece);
        req.push(requestBytes(CMD.READ, BigInt(base + p * piece), piece, { cookie }));
      }
      c.send(concat(...req));
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
    // Nothing to say about healthy clients: no error, and no runtime warning
    // (Node once warned of a leak past 10 connections: one AbortSignal listener each).
    assert.equal(server.stderr(), "");
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

  test("clients that reset the connection with replies in flight: no error logged, none left open", async () => {
    const fdsBefore = fdCount(server.pid);
    const stderrBefore = server.stderr().length;
    for (let i = 0; i < 40; i++) {
      const c = await RawClient.connect(server.socket);
      await c.go();
      for (let k = 0; k < 16; k++) c.request(CMD.READ, BigInt(k * MiB), MiB, { cookie: BigInt(k) });
      // Closing with replies unread resets the connection under the server's writes.
      if (i % 2 === 1) await new Promise((r) => setTimeout(r, i % 4 === 1 ? 1 : 20));
      c.destroy();
    }
    let fds = fdCount(server.pid);
    for (let i = 0; i < 100 && fds > fdsBefore; i++) {
      await new Promise((r) => setTimeout(r, 50));
      fds = fdCount(server.pid);
    }
    assert.ok(fds <= fdsBefore, `${fds} descriptors open, ${fdsBefore} before`);
    // Deno said "error: operation canceled" for the read its own close cut short.
    assert.doesNotMatch(server.stderr().slice(stderrBefore), /error/);
    const r = nbdsh(server.uri, `assert len(h.pread(65536, 0)) == 65536\nprint("ok")`);
    assert.equal(r.stdout.trim(), "ok", r.stderr);
  });

  test("clients killed with SIGKILL mid-write and mid-read; the others carry on", async () => {
    const fdsBefore = fdCount(server.pid);
    const stderrBefore = server.stderr().length;
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
    // A client that goes away is no error of the server's (Deno said "Bad resource ID").
    assert.doesNotMatch(server.stderr().slice(stderrBefore), /error/);

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
