/**
 * The paced FIFO writer (runtime/paced_pipe.ts) against a simulated pipe
 * whose reader drains it at a chosen rate, on a simulated clock (so that a
 * busy machine, whose timers come late, cannot change the outcome): which way
 * it waits, and that every byte arrives once, in order. The real FIFOs of
 * every runtime are in runtime_adapter_test.ts.
 *
 * @module
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  EAGAIN,
  EINTR,
  EPIPE,
  pacedPipeWritable,
  type PacingClock,
  PAUSE_MS,
  writeOutcome,
} from "../runtime/paced_pipe.ts";

const CAPACITY = 64 * 1024;

/**
 * Simulated time: it moves only when the writer sleeps, by what it asked
 * for, or by `took(nth, ms)` for its nth sleep (a late timer).
 */
function simulatedClock(took = (_nth: number, ms: number) => ms): PacingClock {
  let now = 0;
  let sleeps = 0;
  return {
    now: () => now,
    sleep(ms) {
      now += took(sleeps++, ms);
      return Promise.resolve();
    },
  };
}

/** A pipe of CAPACITY bytes drained at `bytesPerMs` of `clock`; counts how the writer waited. */
function simulatedPipe(bytesPerMs: number, clock: PacingClock) {
  let level = 0;
  let last = clock.now();
  const got: Uint8Array[] = [];
  const stats = { writeAll: 0, full: 0, closed: 0 };
  const drain = () => {
    const now = clock.now();
    level = Math.max(0, level - (now - last) * bytesPerMs);
    last = now;
  };
  const pipe = {
    tryWrite(buf: Uint8Array) {
      drain();
      // Like a real pipe: room comes in whole pages.
      const n = Math.min(buf.length, Math.floor((CAPACITY - level) / 4096) * 4096);
      if (n <= 0) {
        stats.full++;
        return -1;
      }
      level += n;
      got.push(buf.slice(0, n));
      return n;
    },
    queued() {
      drain();
      return Math.floor(level);
    },
    writeAll(buf: Uint8Array) {
      stats.writeAll++;
      got.push(buf.slice());
      return Promise.resolve();
    },
    close() {
      stats.closed++;
    },
  };
  const bytes = () => {
    const out = new Uint8Array(got.reduce((n, b) => n + b.length, 0));
    let at = 0;
    for (const b of got) {
      out.set(b, at);
      at += b.length;
    }
    return out;
  };
  return { pipe, stats, bytes };
}

function data(size: number): Uint8Array {
  return new Uint8Array(size).map((_, i) => (i * 7 + (i >> 8)) & 0xff);
}

async function writeAllOf(stream: WritableStream<Uint8Array>, bytes: Uint8Array, chunk: number) {
  const w = stream.getWriter();
  for (let at = 0; at < bytes.length; at += chunk) await w.write(bytes.subarray(at, at + chunk));
  await w.close();
}

test("a slow reader: the writer sleeps on a full pipe and never waits in write(2)", async () => {
  // A 32nd of the pipe per ms: a sleep would have to last 28 ms, twice in a
  // row, for the pipe to look empty.
  const clock = simulatedClock();
  const { pipe, stats, bytes } = simulatedPipe(CAPACITY / 32, clock);
  const input = data(6 * CAPACITY);
  await writeAllOf(pacedPipeWritable(pipe, CAPACITY, clock), input, 20_000);
  assert.deepEqual(bytes(), input);
  assert.ok(stats.full > 0, `the pipe filled up ${JSON.stringify(stats)}`);
  assert.equal(stats.writeAll, 0);
  assert.equal(stats.closed, 1);
});

test("a reader faster than the timer: the writer goes back to waiting in write(2)", async () => {
  const clock = simulatedClock();
  const { pipe, stats, bytes } = simulatedPipe(CAPACITY / PAUSE_MS, clock); // the whole pipe within a tick
  const input = data(40 * CAPACITY);
  await writeAllOf(pacedPipeWritable(pipe, CAPACITY, clock), input, 3 * CAPACITY);
  assert.deepEqual(bytes(), input);
  assert.ok(stats.writeAll > 0, `switched to blocking writes ${JSON.stringify(stats)}`);
  // Two ordinary ticks that find the pipe empty decide (paced all the way: 39 full pipes).
  assert.equal(stats.full, 2, `ticks lost before switching ${JSON.stringify(stats)}`);
  assert.equal(stats.closed, 1);
});

test("late timers prove nothing: a long sleep between two that find the pipe empty keeps pacing", async () => {
  // Every other sleep lasts five ticks (the event loop was busy): the pipe is
  // empty after each, but never after two ordinary ticks in a row.
  const clock = simulatedClock((nth, ms) => nth % 2 ? 5 * ms : ms);
  const { pipe, stats, bytes } = simulatedPipe(CAPACITY / PAUSE_MS, clock);
  const input = data(40 * CAPACITY);
  await writeAllOf(pacedPipeWritable(pipe, CAPACITY, clock), input, 3 * CAPACITY);
  assert.deepEqual(bytes(), input);
  assert.equal(stats.writeAll, 0, `stayed paced ${JSON.stringify(stats)}`);
  assert.ok(stats.full >= 30, `slept on full pipes ${JSON.stringify(stats)}`);
});

test("writeOutcome: EAGAIN is a full pipe, EINTR a retry, EPIPE and others throw with a code", () => {
  assert.equal(writeOutcome(5, () => assert.fail("errno read on success")), 5);
  assert.equal(writeOutcome(-1, () => EAGAIN), -1);
  assert.equal(writeOutcome(-1, () => EINTR), 0);
  assert.throws(() => writeOutcome(-1, () => EPIPE), { code: "EPIPE", message: /Broken pipe/ });
  assert.throws(() => writeOutcome(-1, () => 28), { code: "ERRNO28" });
});

test("a failing write rejects the stream's write and closes the descriptor once", async () => {
  const clock = simulatedClock();
  const { pipe, stats } = simulatedPipe(0, clock);
  pipe.tryWrite = () => writeOutcome(-1, () => EPIPE);
  const w = pacedPipeWritable(pipe, CAPACITY, clock).getWriter();
  await assert.rejects(w.write(new Uint8Array(10)), { code: "EPIPE" });
  await w.abort().catch(() => {});
  assert.equal(stats.closed, 1);
});
