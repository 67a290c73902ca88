/**
 * Unit tests of the streaming plugin: its parts on in-memory streams, then
 * the plugin's callbacks called directly against real FIFOs read and fed by
 * child processes (no NBD server involved).
 *
 * @module
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ReorderWindow } from "../plugins/streaming/reorder_window.ts";
import { RetainedBytes } from "../plugins/streaming/retained_bytes.ts";
import { OrderedSink } from "../plugins/streaming/ordered_sink.ts";
import { StagingRing } from "../plugins/streaming/staging_ring.ts";
import { MAX_HELD_RANGES, StreamWriter } from "../plugins/streaming/stream_writer.ts";
import { READ_CHUNK, StreamReader } from "../plugins/streaming/stream_reader.ts";
import { formatDuration, formatProgress, ProgressLine } from "../plugins/streaming/progress.ts";
import { createStreamingPlugin, DEFAULT_SIZE } from "../plugins/streaming.ts";
import { setStdioSafe } from "../plugins/stdio.ts";
import { NbdError } from "../plugins/errors.ts";
import { scratch } from "./helpers.ts";

const MiB = 1024 * 1024;

/** Deterministic pseudo-random bytes (xorshift), so failures reproduce. */
function pattern(length: number, seed = 1): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

function bytes(...values: number[]): Uint8Array {
  return new Uint8Array(values);
}

/** A writable stream collecting what it gets, optionally slow, optionally failing. */
function collector(options: { delayMs?: number; failAfter?: number } = {}) {
  const chunks: Uint8Array[] = [];
  let total = 0;
  const stream = new WritableStream<Uint8Array>({
    async write(chunk) {
      if (options.delayMs) await new Promise((r) => setTimeout(r, options.delayMs));
      if (options.failAfter !== undefined && total + chunk.length > options.failAfter) {
        const err = new Error("Broken pipe (os error 32)");
        throw err;
      }
      chunks.push(chunk.slice());
      total += chunk.length;
    },
  });
  return {
    stream,
    get total() {
      return total;
    },
    all(): Uint8Array {
      const out = new Uint8Array(total);
      let at = 0;
      for (const c of chunks) {
        out.set(c, at);
        at += c.length;
      }
      return out;
    },
  };
}

function newWriter(window: number, out = collector(), stagingBytes = 0) {
  let writer: StreamWriter | null = null;
  const sink = new OrderedSink(Promise.resolve(out.stream), {
    stagingBytes,
    onError: (err, written) => writer?.fail(`pipe failed after ${written} bytes: ${err}`),
  });
  writer = new StreamWriter({ sink, window });
  return { writer, sink, out };
}

async function rejectsWith(p: Promise<unknown>, errno: string, text: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof NbdError, `not an NbdError: ${err}`);
    assert.equal(err.errno, errno);
    assert.match(err.message, text);
    return true;
  });
}

// ---------------------------------------------------------------- ReorderWindow

test("window: releases contiguous ranges in order, keeps the rest", () => {
  const w = new ReorderWindow();
  w.insert(10, bytes(1, 2));
  w.insert(4, bytes(3, 4));
  w.insert(6, null, 4); // zeroes 6..9
  assert.equal(w.bytes, 4);
  assert.equal(w.count, 3);
  assert.deepEqual(w.takeFrom(0), []);
  const out = w.takeFrom(4);
  assert.deepEqual(out.map((r) => [r.offset, r.length, r.data ? [...r.data] : null]), [
    [4, 2, [3, 4]],
    [6, 4, null],
    [10, 2, [1, 2]],
  ]);
  assert.equal(w.bytes, 0);
  assert.equal(w.count, 0);
});

test("window: a later write replaces the overlapped part of a held one", () => {
  const w = new ReorderWindow();
  w.insert(0, bytes(1, 1, 1, 1, 1, 1));
  assert.equal(w.growth(2, 2, true), 0);
  assert.equal(w.growth(4, 4, true), 2);
  assert.equal(w.growth(0, 3, false), -3);
  w.insert(2, bytes(9, 9));
  w.insert(5, null, 3);
  assert.equal(w.bytes, 5);
  const all = w.takeAll();
  assert.deepEqual(all.map((r) => [r.offset, r.length, r.data ? [...r.data] : null]), [
    [0, 2, [1, 1]],
    [2, 2, [9, 9]],
    [4, 1, [1]],
    [5, 3, null],
  ]);
});

test("window: discardBefore trims what the stream has passed", () => {
  const w = new ReorderWindow();
  w.insert(4, bytes(1, 2, 3, 4));
  w.discardBefore(6);
  assert.equal(w.first, 6);
  assert.equal(w.bytes, 2);
  assert.deepEqual([...w.takeFrom(6)[0].data!], [3, 4]);
  assert.equal(w.end, 0);
});

// ---------------------------------------------------------------- RetainedBytes

test("retained: keeps the head and the recent window, nothing between", () => {
  const r = new RetainedBytes(4, 8);
  for (let i = 0; i < 10; i++) r.append(pattern(3, i + 1));
  const all = new Uint8Array(30);
  for (let i = 0; i < 10; i++) all.set(pattern(3, i + 1), i * 3);
  assert.equal(r.end, 30);
  const buf = new Uint8Array(4);
  assert.ok(r.copyOut(buf, 0));
  assert.deepEqual(buf, all.subarray(0, 4));
  const tail = new Uint8Array(8);
  assert.ok(r.copyOut(tail, 22));
  assert.deepEqual(tail, all.subarray(22, 30));
  assert.ok(!r.copyOut(new Uint8Array(2), 10), "the middle is gone");
  assert.ok(!r.copyOut(new Uint8Array(2), 29), "past the end");
});

test("retained: a read across chunk boundaries and from head into window", () => {
  const r = new RetainedBytes(5, 100);
  const all = pattern(40);
  for (let i = 0; i < 40; i += 7) r.append(all.slice(i, i + 7));
  const buf = new Uint8Array(30);
  assert.ok(r.copyOut(buf, 3));
  assert.deepEqual(buf, all.subarray(3, 33));
});

test("retained: a chunk filling little of its buffer is kept as a copy, a full one as it is", () => {
  // A pipe read of a trickling writer: 4 KiB in a 64 KiB buffer. Holding the
  // buffer would make a 64 MiB window cost a gigabyte.
  const r = new RetainedBytes(0, 1 << 20);
  const big = new Uint8Array(65536).fill(7);
  r.append(big.subarray(0, 4096));
  const full = new Uint8Array(8192).fill(9);
  r.append(full);
  big.fill(1); // the store's bytes are its own
  full.fill(2); // the store owns this chunk: it was not copied
  const buf = new Uint8Array(4096 + 8192);
  assert.ok(r.copyOut(buf, 0));
  assert.ok(buf.subarray(0, 4096).every((b) => b === 7));
  assert.ok(buf.subarray(4096).every((b) => b === 2));
});

test("retained: a chunk's buffer is handed back once nothing reads from it", () => {
  const released: ArrayBufferLike[] = [];
  const r = new RetainedBytes(0, 8, (b) => released.push(b));
  const chunks = [0, 1, 2, 3].map((i) => pattern(4, i + 1));
  r.append(chunks[0]);
  r.append(chunks[1]);
  r.append(chunks[2]);
  assert.deepEqual(released, [chunks[0].buffer], "the window needs only the last 8 bytes");
  const trickle = new Uint8Array(16);
  trickle[0] = 5;
  r.append(trickle.subarray(0, 1)); // copied: its buffer is free at once
  assert.equal(released.at(-1), trickle.buffer);
  const buf = new Uint8Array(9);
  assert.ok(r.copyOut(buf, 4));
  assert.deepEqual(buf, new Uint8Array([...chunks[1], ...chunks[2], 5]));
});

// ---------------------------------------------------------------- OrderedSink

test("sink: writes in push order, zero runs included, before and after opening", async () => {
  const out = collector();
  let open!: (s: WritableStream<Uint8Array>) => void;
  const sink = new OrderedSink(new Promise((r) => open = r));
  sink.enqueue(bytes(1, 2));
  const z = sink.writeZeroes(3);
  assert.equal(sink.isOpen, false);
  open(out.stream);
  await z;
  const w = sink.write(bytes(7));
  sink.enqueue(null, 2 * MiB + 1);
  await w;
  await sink.drain();
  assert.equal(sink.written, 2 + 3 + 1 + 2 * MiB + 1);
  assert.equal(sink.queuedOwned, 0);
  const all = out.all();
  assert.deepEqual([...all.subarray(0, 6)], [1, 2, 0, 0, 0, 7]);
  assert.ok(all.subarray(6).every((b) => b === 0));
  await sink.close();
});

test("sink: a failing stream rejects what is queued and reports once", async () => {
  const out = collector({ failAfter: 4 });
  const reports: string[] = [];
  const sink = new OrderedSink(Promise.resolve(out.stream), {
    onError: (err, written) => reports.push(`${written}: ${(err as Error).message}`),
  });
  const a = sink.write(bytes(1, 2, 3));
  const b = sink.write(bytes(4, 5, 6));
  await a;
  await assert.rejects(b, /Broken pipe/);
  await assert.rejects(sink.write(bytes(1)), /Broken pipe/);
  assert.deepEqual(reports, ["3: Broken pipe (os error 32)"]);
  await sink.close();
});

test("sink: closing a stream that never opened does not wait for it", async () => {
  const sink = new OrderedSink(new Promise(() => {}));
  await sink.close();
});

// ---------------------------------------------------------------- StreamWriter

test("writer: out-of-order writes within the window come out in order", async () => {
  const { writer, out } = newWriter(8 * MiB);
  const data = pattern(4 * MiB);
  const order = [3, 1, 0, 2, 7, 5, 6, 4, 15, 8, 9, 10, 11, 12, 14, 13];
  const piece = data.length / 16;
  await Promise.all(
    order.map((i) => writer.write(data.subarray(i * piece, (i + 1) * piece), i * piece)),
  );
  assert.equal(writer.held, 0);
  await writer.finish();
  assert.deepEqual(out.all(), data);
});

test("writer: held writes are copies (the server reuses its buffers)", async () => {
  const { writer, out } = newWriter(MiB);
  const buf = bytes(5, 6);
  await writer.write(buf, 2);
  buf.fill(0xff);
  await writer.write(bytes(3, 4), 0);
  await writer.finish();
  assert.deepEqual([...out.all()], [3, 4, 5, 6]);
});

test("writer: gaps and zero requests become zeroes; flush releases everything", async () => {
  const { writer, sink, out } = newWriter(MiB);
  await writer.write(bytes(1), 0);
  await writer.zero(3, 1);
  await writer.write(bytes(9), 10); // gap 4..9
  await writer.zero(2, 11);
  assert.equal(sink.written, 4);
  await writer.flush();
  assert.equal(sink.written, 13);
  assert.deepEqual([...out.all()], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0]);
  await writer.finish();
});

test("writer: reads past the highest write are zeroes, behind it an error", async () => {
  const { writer } = newWriter(MiB);
  await writer.write(bytes(1, 2, 3, 4), 0);
  await writer.write(bytes(1, 2), 8);
  const buf = new Uint8Array(4).fill(7);
  writer.read(buf, 10);
  assert.deepEqual([...buf], [0, 0, 0, 0]);
  assert.throws(() => writer.read(buf, 6), /Cannot read back offset 6 .*offset 10/);
  assert.equal(writer.failure, null, "a read is not fatal");
  await writer.finish();
});

test("writer: a backwards write stops the stream, with offsets, for every later request", async () => {
  const { writer } = newWriter(MiB);
  await writer.write(bytes(1, 2, 3, 4), 0);
  await rejectsWith(writer.write(bytes(1), 2), "EIO", /offset 2 .*the first 4 bytes/);
  await rejectsWith(writer.write(bytes(1), 4), "EIO", /stopped earlier.*offset 2/);
  await rejectsWith(writer.flush(), "EIO", /stopped earlier/);
  assert.throws(() => writer.read(new Uint8Array(1), 100), /stopped earlier/);
  await writer.finish();
});

test("writer: a write that overflows the window stops the stream", async () => {
  const { writer, out } = newWriter(4096);
  await writer.write(new Uint8Array(512), 0);
  await writer.write(new Uint8Array(4096), 1024); // held, fills the window
  await writer.zero(MiB, 8192); // zeroes cost nothing
  await rejectsWith(
    writer.write(new Uint8Array(512), 6144),
    "EIO",
    /offset 6144 \(512 bytes\) would overflow the reorder window \(window=4 KiB\): 4096 bytes are held waiting for offset 512/,
  );
  await rejectsWith(writer.write(new Uint8Array(512), 512), "EIO", /stopped earlier.*6144/);
  await writer.finish();
  assert.equal(out.total, 512, "nothing held is streamed after a failure");
});

test("writer: without staging, in-order writes wait for the pipe, held ones do not", async () => {
  const { writer, out } = newWriter(MiB, collector({ delayMs: 30 }));
  // At once: before a zero-delay timer, which fires before the pipe's 30 ms one.
  let held = false;
  const heldWrite = writer.write(bytes(2), 1).then(() => held = true);
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(held, true, "a held write is acknowledged at once");
  await heldWrite;
  const first = writer.write(bytes(1), 0);
  let settled = false;
  first.then(() => settled = true);
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(settled, false, "an in-order write settles only once written");
  await first;
  assert.ok(out.total >= 1);
  await writer.finish();
  assert.deepEqual([...out.all()], [1, 2]);
});

test("writer: staged in-order writes settle at once until the ring is full", async () => {
  const { writer, sink, out } = newWriter(MiB, collector({ delayMs: 20 }), 4096);
  const data = pattern(8192, 9);
  const settled: number[] = [];
  const t0 = performance.now();
  const all = [0, 1, 2, 3].map((i) =>
    writer.write(data.slice(i * 2048, (i + 1) * 2048), i * 2048).then(() =>
      settled.push(performance.now() - t0)
    )
  );
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(settled.length, 2, "two 2 KiB writes fit in the 4 KiB ring");
  assert.ok(sink.staged <= 4096);
  await Promise.all(all);
  assert.ok(settled[2] >= 15, `the third waited for the pipe: ${settled}`);
  await writer.flush();
  assert.deepEqual(out.all(), data);
  await writer.finish();
});

test("sink: a write larger than the ring goes unstaged, in order", async () => {
  const out = collector();
  const sink = new OrderedSink(Promise.resolve(out.stream), { stagingBytes: 4 });
  const a = sink.stage(bytes(1, 2, 3));
  const b = sink.stage(bytes(4, 5, 6, 7, 8, 9));
  const c = sink.stage(bytes(10));
  await Promise.all([a, b, c]);
  await sink.drain();
  assert.deepEqual([...out.all()], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  await sink.close();
});

test("ring: first in, first out, wrapping, never overlapping", () => {
  const ring = new StagingRing(100);
  const live: Uint8Array[] = [];
  let seed = 7;
  const rand = (n: number) => (seed = (seed * 1103515245 + 12345) % 2147483648) % n;
  let stamp = 0;
  for (let step = 0; step < 5000; step++) {
    if (live.length > 0 && rand(3) === 0) {
      const oldest = live.shift()!;
      assert.ok(oldest.every((b) => b === oldest[0]), "a live piece was overwritten");
      ring.free(oldest);
    } else {
      const piece = ring.alloc(1 + rand(40));
      if (piece) {
        piece.fill(++stamp & 0xff);
        live.push(piece);
      }
    }
    assert.equal(ring.used, live.reduce((n, p) => n + p.length, 0));
  }
  assert.equal(ring.alloc(101), null);
  const fresh = new StagingRing(10);
  fresh.alloc(2);
  const second = fresh.alloc(3)!;
  assert.throws(() => fresh.free(second), /freed out of order/);
});

test("writer: memory stays within the window while a slow reader drains", async () => {
  const window = 256 * 1024;
  const { writer, sink, out } = newWriter(window, collector({ delayMs: 2 }));
  const piece = 64 * 1024;
  const total = 64;
  const data = pattern(piece * total, 7);
  let peak = 0;
  const pending: Promise<void>[] = [];
  // Pairs swapped: the odd piece arrives first and is held, then the even one releases both.
  for (let i = 0; i < total; i += 2) {
    for (const j of [i + 1, i]) {
      pending.push(writer.write(data.subarray(j * piece, (j + 1) * piece), j * piece));
      peak = Math.max(peak, writer.held + sink.queuedOwned);
    }
    if (i % 8 === 0) await Promise.resolve();
  }
  await Promise.all(pending);
  await writer.finish();
  assert.ok(peak <= window, `peak ${peak} > window ${window}`);
  assert.ok(peak > window / 2, `the window was not exercised: peak ${peak}`);
  assert.deepEqual(out.all(), data);
});

test("writer: held zero runs cost no memory, but their number is bounded", async () => {
  const { writer } = newWriter(MiB);
  for (let i = 1; i <= MAX_HELD_RANGES; i++) await writer.zero(1, 2 * i);
  assert.equal(writer.held, 0);
  await rejectsWith(writer.zero(1, 1), "EIO", /65536 ranges are held waiting for offset 0/);
  await writer.finish();
});

test("writer: a failing pipe is a clean error on the next request", async () => {
  const { writer } = newWriter(MiB, collector({ failAfter: 1000 }));
  await writer.write(new Uint8Array(512), 0);
  await rejectsWith(writer.write(new Uint8Array(512), 512), "EIO", /pipe failed after 512 bytes/);
  await rejectsWith(writer.write(new Uint8Array(512), 1024), "EIO", /stopped earlier/);
  await writer.finish();
});

// ---------------------------------------------------------------- StreamReader

function source(data: Uint8Array, chunk: number): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream<Uint8Array>({
    pull(c) {
      if (at >= data.length) return c.close();
      c.enqueue(data.slice(at, at + chunk));
      at += chunk;
    },
  });
}

test("reader: serves the stream in order, re-reads the head and recent bytes", async () => {
  const data = pattern(8 * MiB, 3);
  const r = new StreamReader({
    source: Promise.resolve(source(data, 65536)),
    window: MiB,
    name: "test",
    readahead: 256 * 1024,
  });
  const buf = new Uint8Array(512 * 1024);
  // Parallel, slightly out of order, as qemu-img's coroutines read.
  await Promise.all([1, 0, 3, 2].map(async (i) => {
    const b = new Uint8Array(512 * 1024);
    await r.read(b, i * b.length);
    assert.deepEqual(b, data.subarray(i * b.length, (i + 1) * b.length));
  }));
  await r.read(buf, 0); // a probe reading sector 0 again
  assert.deepEqual(buf, data.subarray(0, buf.length));
  await r.read(buf, 6 * MiB); // a forward skip
  assert.deepEqual(buf, data.subarray(6 * MiB, 6 * MiB + buf.length));
  await r.read(buf, 5 * MiB + 768 * 1024); // recent
  assert.deepEqual(buf, data.subarray(5 * MiB + 768 * 1024, 6 * MiB + 256 * 1024));
  await rejectsWith(r.read(buf, 2 * MiB), "EIO", /Cannot read offset 2097152 .*again/);
  await rejectsWith(r.read(buf, 7 * MiB), "EIO", /stopped earlier/);
  await r.close();
});

test("reader: a byte stream is read into whole buffers, reused once they leave the window", async () => {
  const data = pattern(16 * MiB, 5);
  let at = 0;
  let fresh = 0; // buffers that arrive all zero were never read into
  let reused = 0;
  const sizes = new Set<number>();
  const bytes = new ReadableStream({
    type: "bytes",
    pull(c) {
      const view = c.byobRequest!.view!;
      const into = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
      sizes.add(into.length);
      if (into.every((b) => b === 0)) fresh++;
      else reused++;
      if (at >= data.length) {
        c.close();
        return c.byobRequest!.respond(0);
      }
      // Three quarters of a buffer at a time, as a pipe that is not quite full gives.
      const n = Math.min(into.length * 3 / 4, data.length - at);
      into.set(data.subarray(at, at + n));
      at += n;
      c.byobRequest!.respond(n);
    },
  });
  const r = new StreamReader({
    source: Promise.resolve(bytes),
    window: 2 * MiB,
    name: "test",
    readahead: MiB,
  });
  const b = new Uint8Array(512 * 1024);
  for (let off = 0; off < data.length; off += b.length) {
    await r.read(b, off);
    assert.deepEqual(b, data.subarray(off, off + b.length), `offset ${off}`);
  }
  await r.read(b, 0); // the head, copied once
  assert.deepEqual(b, data.subarray(0, b.length));
  assert.deepEqual([...sizes], [READ_CHUNK]);
  assert.ok(fresh <= 6, `${fresh} buffers allocated for a 2 MiB window`);
  assert.ok(reused >= 15, `${reused} buffers reused`);
  await r.close();
});

test("reader: the end of the stream before the end of the read is EIO with the offset", async () => {
  const r = new StreamReader({
    source: Promise.resolve(source(pattern(1000), 300)),
    window: MiB,
    name: "test",
  });
  const buf = new Uint8Array(512);
  await r.read(buf, 0);
  await rejectsWith(r.read(buf, 512), "EIO", /The stream ended at offset 1000/);
  assert.equal(r.failure, null);
  await r.read(buf, 0); // still there
  await r.close();
});

test("reader: a source that cannot open fails every request", async () => {
  const r = new StreamReader({
    source: Promise.reject(new Error("Permission denied")),
    window: MiB,
    name: "'x'",
  });
  await rejectsWith(r.read(new Uint8Array(1), 0), "EIO", /Cannot open 'x': Permission denied/);
  await r.close();
});

// ---------------------------------------------------------------- progress

test("progress: the line's text", () => {
  assert.equal(formatDuration(7), "0:07");
  assert.equal(formatDuration(754), "12:34");
  assert.equal(formatDuration(3723), "1:02:03");
  assert.equal(
    formatProgress({ verb: "written", bytes: 3 * MiB / 2, rate: 0, total: null }),
    "streaming: 1.5 MiB written",
  );
  assert.equal(
    formatProgress({ verb: "read", bytes: 256 * MiB, rate: 128 * MiB, total: 1024 * MiB }),
    "streaming: 256 MiB read, 128 MiB/s, 25%, ETA 0:06",
  );
  assert.equal(
    formatProgress({ verb: "read", bytes: 2048, rate: 10, total: 1024 }),
    "streaming: 2 KiB read, 10 B/s, 100%",
  );
});

test("progress: rewrites one line, measures a recent rate, clears at the end", () => {
  let out = "";
  let t = 0;
  let n = 0;
  let open = false;
  const p = new ProgressLine({
    write: (s) => out += s,
    bytes: () => n,
    active: () => open,
    verb: "written",
    total: 10 * MiB,
    now: () => t,
  });
  p.update();
  assert.equal(out, "", "nothing before the stream opens");
  open = true;
  p.update();
  t = 1000;
  n = 2 * MiB;
  p.update();
  assert.ok(out.endsWith("\rstreaming: 2 MiB written, 2 MiB/s, 20%, ETA 0:04\x1b[K"), out);
  assert.ok(!out.includes("\n"));
  p.stop();
  assert.ok(out.endsWith("\r\x1b[K"));
});

// ---------------------------------------------------------------- the plugin itself

test("plugin: - is refused when stdin/stdout carry the NBD connection (-s)", async () => {
  for (const key of ["write", "read"]) {
    const p = createStreamingPlugin();
    await p.config!(key, "-");
    await p.configComplete!();
    setStdioSafe(false);
    try {
      await assert.rejects(
        async () => await p.getReady!(),
        new RegExp(`${key}=- cannot be used with -s`),
      );
    } finally {
      setStdioSafe(true);
    }
  }
});

test("plugin: parameters", async () => {
  const none = createStreamingPlugin();
  await none.config!("size", "1G");
  assert.throws(() => none.configComplete!(), /one of the parameters write=FILE .* or read=FILE/);
  const two = createStreamingPlugin();
  await two.config!("write", "a");
  await two.config!("read", "b");
  assert.throws(() => two.configComplete!(), /only one of .* not write= and read=/);
  const both = createStreamingPlugin();
  await both.config!("pipe", "a");
  await both.config!("write", "b");
  assert.throws(() => both.configComplete!(), /not pipe= and write=/);
  assert.throws(() => createStreamingPlugin().config!("bogus", "1"), /unknown parameter 'bogus'/);
  assert.throws(() => createStreamingPlugin().config!("size", "1X"), /unknown suffix/);
  const p = createStreamingPlugin();
  await p.config!("pipe", "/dev/null");
  await p.configComplete!();
  assert.equal(await p.getSize(null), DEFAULT_SIZE);
  assert.equal(DEFAULT_SIZE, 9223372035781033984n);
  assert.equal(DEFAULT_SIZE % 512n, 0n);
  assert.match(p.configHelp!, /pipe=FILE/);
  assert.match(p.configHelp!, /read=FILE/);
  assert.match(p.configHelp!, /window=SIZE/);
});

/** Run a shell command; resolves with its stdout once it exits. */
function child(script: string): { done: Promise<{ status: number; stdout: string }> } {
  const c = spawn("/bin/sh", ["-c", script], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  c.stdout.setEncoding("utf8");
  c.stdout.on("data", (d: string) => stdout += d);
  c.stderr.resume();
  return {
    done: new Promise((resolve) =>
      c.on("close", (status) => resolve({ status: status ?? 1, stdout }))
    ),
  };
}

function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

test("plugin: out-of-order writes through the window into a FIFO read by sha256sum", async () => {
  const { dir, cleanup } = scratch();
  try {
    const fifo = join(dir, "out");
    const plugin = createStreamingPlugin();
    await plugin.config!("write", fifo);
    await plugin.configComplete!();
    await plugin.getReady!(); // creates the FIFO and returns without a reader
    assert.ok(statSync(fifo).isFIFO());
    const h = await plugin.open({ readonly: false, exportName: "", tls: false, connection: 1 });
    assert.equal(await plugin.canWrite!(h), true);
    assert.equal(await plugin.canFua!(h), "none");

    const data = pattern(24 * MiB, 11);
    data.fill(0, 4 * MiB, 6 * MiB); // written as WRITE_ZEROES below
    const reader = child(`sha256sum < '${fifo}'`);
    const piece = 256 * 1024;
    const pending: Promise<void>[] = [];
    // Sixteen requests in flight, issued in a scrambled order within each group.
    for (let g = 0; g < data.length / piece; g += 16) {
      for (const k of [2, 0, 1, 5, 3, 4, 8, 6, 7, 11, 9, 10, 15, 12, 14, 13]) {
        const off = (g + k) * piece;
        if (off >= 4 * MiB && off < 6 * MiB) {
          pending.push(Promise.resolve(plugin.zero!(h, piece, off, zeroFlags)));
        } else {
          pending.push(
            Promise.resolve(plugin.pwrite!(h, data.slice(off, off + piece), off, noFua)),
          );
        }
      }
      await Promise.all(pending.splice(0));
    }
    await plugin.flush!(h);
    await plugin.close?.(h);
    await plugin.unload!();
    const { status, stdout } = await reader.done;
    assert.equal(status, 0);
    assert.equal(stdout.split(" ")[0], sha256(data));
  } finally {
    cleanup();
  }
});

const noFua = { fua: false };
const zeroFlags = { fua: false, mayTrim: true, fastZero: false };

test("plugin: the reader going away is an error on the next request, not a crash", async () => {
  const { dir, cleanup } = scratch();
  try {
    const fifo = join(dir, "out");
    const plugin = createStreamingPlugin();
    await plugin.config!("pipe", fifo);
    await plugin.configComplete!();
    await plugin.getReady!();
    const h = await plugin.open({ readonly: false, exportName: "", tls: false, connection: 1 });
    const reader = child(`head -c 1000 < '${fifo}' > /dev/null`);
    let offset = 0;
    let error: unknown = null;
    for (let i = 0; i < 200 && error === null; i++) {
      try {
        await plugin.pwrite!(h, new Uint8Array(64 * 1024), offset, noFua);
        offset += 64 * 1024;
      } catch (err) {
        error = err;
      }
    }
    await reader.done;
    assert.ok(error instanceof NbdError, `no error after ${offset} bytes`);
    assert.equal(error.errno, "EIO");
    assert.match(error.message, /The reader of '.*out' went away \(broken pipe\)/);
    await assert.rejects(
      Promise.resolve(plugin.open({ readonly: false, exportName: "", tls: false, connection: 2 })),
      /stopped earlier: The reader .* went away/,
    );
    await plugin.unload!();
  } finally {
    cleanup();
  }
});

test("plugin: read= serves a FIFO fed by cat, in parallel reads", async () => {
  const { dir, cleanup } = scratch();
  try {
    const fifo = join(dir, "in");
    const src = join(dir, "src");
    const data = pattern(16 * MiB, 5);
    writeFileSync(src, data);
    const plugin = createStreamingPlugin();
    await plugin.config!("read", fifo);
    await plugin.config!("size", "16M");
    await plugin.configComplete!();
    await plugin.getReady!();
    assert.ok(existsSync(fifo));
    const h = await plugin.open({ readonly: false, exportName: "", tls: false, connection: 1 });
    assert.equal(await plugin.canWrite!(h), false);
    assert.equal(await plugin.getSize(h), 16n * BigInt(MiB));
    const writer = child(`cat '${src}' > '${fifo}'`);
    const piece = 2 * MiB;
    const got = new Uint8Array(data.length);
    await Promise.all(
      [1, 0, 2, 4, 3, 5, 7, 6].map((i) =>
        plugin.pread(h, got.subarray(i * piece, (i + 1) * piece), i * piece)
      ),
    );
    assert.ok(Buffer.from(got).equals(Buffer.from(data)));
    const head = new Uint8Array(512);
    await plugin.pread(h, head, 0);
    assert.deepEqual(head, data.subarray(0, 512));
    await assert.rejects(
      Promise.resolve(plugin.pwrite!(h, head, 0, noFua)),
      (err: unknown) => err instanceof NbdError && err.errno === "EPERM",
    );
    await plugin.unload!();
    assert.equal((await writer.done).status, 0);
  } finally {
    cleanup();
  }
});
