/**
 * The write end of the stream: bytes and zero runs queued in stream order
 * and written one after the other to a `WritableStream` that may still be
 * opening (a FIFO opens only once a reader appears).
 *
 * In-order writes are staged: copied into a fixed ring and acknowledged
 * there, so the client sends its next write while the pipe is still
 * draining the previous one (a client with one write in flight would
 * otherwise leave the reader idle for a round trip per request). When the
 * ring is full, staging waits for the pipe: that wait is the backpressure.
 *
 * The sink also counts what it holds on the plugin's behalf outside the
 * ring (`queuedOwned`) so that the plugin can bound its memory.
 *
 * @module
 */
import { StagingRing } from "./staging_ring.ts";

/** Zero runs are written from this shared, never modified buffer. */
const ZERO_CHUNK = 1024 * 1024;
let zeroes: Uint8Array | undefined;

interface Item {
  data: Uint8Array | null;
  length: number;
  /** Bytes the sink owns outside the ring (counted in queuedOwned). */
  owned: boolean;
  /** Waiting to be copied into the ring. */
  stage: boolean;
  /** Copied into the ring: freed there once written. */
  ringed: boolean;
  /** The pump has started writing it. */
  started: boolean;
  resolve?: () => void;
  reject?: (err: unknown) => void;
}

/** Options of an {@linkcode OrderedSink}. */
export interface OrderedSinkOptions {
  /** Called once when the stream fails (open or write), with the bytes written until then. */
  onError?: (err: unknown, written: number) => void;
  /** Size of the staging ring (0: in-order writes wait until they are written). */
  stagingBytes?: number;
}

/**
 * An ordered queue in front of a writable byte stream.
 *
 * @example Writing to an in-memory stream
 * ```ts
 * import { OrderedSink } from "./ordered_sink.ts";
 * const got: number[] = [];
 * const stream = new WritableStream<Uint8Array>({ write: (c) => void got.push(...c) });
 * const sink = new OrderedSink(Promise.resolve(stream), { stagingBytes: 1024 });
 * sink.enqueue(null, 2); // two zero bytes
 * await sink.stage(new Uint8Array([7])); // acknowledged once copied
 * await sink.close();
 * console.assert(got.join() === "0,0,7");
 * ```
 */
export class OrderedSink {
  #opened: Promise<WritableStream<Uint8Array>>;
  #stream: WritableStream<Uint8Array> | null = null;
  #writer: WritableStreamDefaultWriter<Uint8Array> | null = null;
  #queue: (Item | undefined)[] = [];
  #head = 0;
  #stageAt = 0;
  #ring: StagingRing;
  #pumping = false;
  #pushed = 0;
  #written = 0;
  #queuedOwned = 0;
  #failed = false;
  #error: unknown = undefined;
  #waiters: (() => void)[] = [];
  #onError: ((err: unknown, written: number) => void) | undefined;

  /**
   * Create a sink.
   *
   * @param opened The stream, once it is open (a rejection fails the sink).
   * @param options Callbacks and the staging ring's size.
   */
  constructor(opened: Promise<WritableStream<Uint8Array>>, options: OrderedSinkOptions = {}) {
    this.#opened = opened;
    this.#onError = options.onError;
    this.#ring = new StagingRing(options.stagingBytes ?? 0);
    opened.then((s) => {
      this.#stream = s;
    }, (err) => this.#fail(err));
  }

  /** Whether the stream has opened. */
  get isOpen(): boolean {
    return this.#stream !== null;
  }

  /** Bytes handed to the sink so far. */
  get pushed(): number {
    return this.#pushed;
  }

  /** Bytes written to the stream so far. */
  get written(): number {
    return this.#written;
  }

  /** Bytes of owned data (see {@linkcode OrderedSink.enqueue}) not written yet. */
  get queuedOwned(): number {
    return this.#queuedOwned;
  }

  /** The size of the staging ring. */
  get stagingBytes(): number {
    return this.#ring.size;
  }

  /** Bytes in the staging ring. */
  get staged(): number {
    return this.#ring.used;
  }

  /** The error that failed the sink, if any. */
  get failed(): { error: unknown } | null {
    return this.#failed ? { error: this.#error } : null;
  }

  /**
   * Queue `data`, which stays the caller's: the promise settles once it is
   * written, and the caller must not touch it before.
   *
   * @param data The bytes.
   * @returns Settles when the bytes are in the stream.
   */
  write(data: Uint8Array): Promise<void> {
    return this.#waitFor({ data, length: data.length, stage: false });
  }

  /**
   * Queue `data`, which stays the caller's until the promise settles: that
   * is once it is copied into the staging ring (at once when there is
   * room), or once it is written when it never fits.
   *
   * @param data The bytes.
   * @returns Settles when the bytes are staged or written.
   */
  stage(data: Uint8Array): Promise<void> {
    return this.#waitFor({ data, length: data.length, stage: true });
  }

  /**
   * Queue a run of `length` zeroes and wait for it to be written.
   *
   * @param length The number of zero bytes.
   * @returns Settles when the zeroes are in the stream.
   */
  writeZeroes(length: number): Promise<void> {
    return this.#waitFor({ data: null, length, stage: false });
  }

  /**
   * Queue bytes the sink now owns (counted in `queuedOwned` until written),
   * or `length` zeroes when `data` is null, without waiting. Failures are
   * reported through `onError`.
   *
   * @param data The bytes, or null for zeroes.
   * @param length The length of a zero run.
   */
  enqueue(data: Uint8Array | null, length = data?.length ?? 0): void {
    if (this.#failed) return;
    const n = data ? data.length : length;
    if (data) this.#queuedOwned += n;
    this.#push(item(data, n, data !== null, false));
  }

  /** Resolves at the next write that completes, or when the sink fails. */
  progress(): Promise<void> {
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  /**
   * Wait until everything queued so far is written.
   *
   * @throws The stream's error, when it failed.
   */
  async drain(): Promise<void> {
    const target = this.#pushed;
    while (this.#written < target && !this.#failed) await this.progress();
    if (this.#failed) throw this.#error;
  }

  /**
   * Write what is queued, then close the stream so the reader sees the end.
   * A stream that never opened is closed whenever it opens, without waiting.
   */
  async close(): Promise<void> {
    if (this.#pushed === 0 && !this.#stream) {
      this.#opened.then((s) => s.close().catch(() => {}), () => {});
      return;
    }
    try {
      await this.drain();
    } catch {
      // already reported through onError
    }
    if (!this.#writer && this.#stream) this.#writer = this.#stream.getWriter();
    if (!this.#writer) return;
    try {
      if (this.#failed) await this.#writer.abort(this.#error);
      else await this.#writer.close();
    } catch (err) {
      this.#fail(err);
    }
  }

  #waitFor(o: { data: Uint8Array | null; length: number; stage: boolean }): Promise<void> {
    if (this.#failed) return Promise.reject(this.#error);
    return new Promise((resolve, reject) => {
      const it = item(o.data, o.length, false, o.stage);
      it.resolve = resolve;
      it.reject = reject;
      this.#push(it);
    });
  }

  #push(it: Item): void {
    this.#pushed += it.length;
    this.#queue.push(it);
    // Staging first: the pump would otherwise start writing the caller's buffer itself.
    if (it.stage) this.#stageWaiting();
    if (!this.#pumping) this.#pump();
  }

  /** Copy waiting items into the ring, in queue order, while there is room. */
  #stageWaiting(): void {
    if (this.#stageAt < this.#head) this.#stageAt = this.#head;
    while (this.#stageAt < this.#queue.length) {
      const it = this.#queue[this.#stageAt]!;
      if (it.stage && !it.started && it.length <= this.#ring.size) {
        const room = this.#ring.alloc(it.length);
        if (!room) return; // later items must not overtake: the ring frees in order
        room.set(it.data!);
        it.data = room;
        it.stage = false;
        it.ringed = true;
        const resolve = it.resolve;
        it.resolve = it.reject = undefined;
        resolve?.();
      }
      this.#stageAt++;
    }
  }

  async #pump(): Promise<void> {
    this.#pumping = true;
    try {
      const writer = this.#writer ??= (this.#stream ?? await this.#opened).getWriter();
      while (this.#head < this.#queue.length && !this.#failed) {
        const it = this.#queue[this.#head]!;
        it.started = true;
        if (it.data) {
          await writer.write(it.data);
          this.#written += it.length;
        } else {
          zeroes ??= new Uint8Array(ZERO_CHUNK);
          for (let left = it.length; left > 0;) {
            const n = Math.min(left, ZERO_CHUNK);
            await writer.write(zeroes.subarray(0, n));
            this.#written += n;
            left -= n;
          }
        }
        this.#queue[this.#head++] = undefined;
        if (it.owned) this.#queuedOwned -= it.length;
        it.resolve?.();
        if (it.ringed) {
          this.#ring.free(it.data!);
          this.#stageWaiting();
        }
        this.#wake();
        if (this.#head > 1024 && this.#head * 2 > this.#queue.length) {
          this.#queue.splice(0, this.#head);
          this.#stageAt -= this.#head;
          this.#head = 0;
        }
      }
    } catch (err) {
      this.#fail(err);
    } finally {
      this.#pumping = false;
    }
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }

  #fail(err: unknown): void {
    if (this.#failed) return;
    this.#failed = true;
    this.#error = err;
    for (let i = this.#head; i < this.#queue.length; i++) this.#queue[i]?.reject?.(err);
    this.#queue = [];
    this.#head = 0;
    this.#stageAt = 0;
    this.#queuedOwned = 0;
    this.#wake();
    this.#onError?.(err, this.#written);
  }
}

function item(data: Uint8Array | null, length: number, owned: boolean, stage: boolean): Item {
  return { data, length, owned, stage, ringed: false, started: false };
}
