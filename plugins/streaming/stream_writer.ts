/**
 * Write mode of the streaming plugin: NBD writes at offsets in, one byte
 * stream out, in offset order, each byte exactly once.
 *
 * A write at the stream position goes to the sink and settles once it is
 * staged there or in the stream (the pipe's backpressure reaches the client
 * through the acknowledgement). A write ahead of the position is copied into the
 * reorder window and settles at once; it is released when the bytes before
 * it have been streamed, or at FLUSH or at the end, where the gaps before
 * held writes become zeroes. A write behind the position, or one that does
 * not fit in the window, stops the stream: an error state every later
 * request reports.
 *
 * @module
 */
import { NbdError } from "../errors.ts";
import { ErrorState } from "./error_state.ts";
import { formatSize } from "../size.ts";
import type { OrderedSink } from "./ordered_sink.ts";
import { ReorderWindow } from "./reorder_window.ts";

/** Zero runs cost no memory, but each held range costs bookkeeping: at most this many. */
export const MAX_HELD_RANGES = 65536;

/** Options of a {@linkcode StreamWriter}. */
export interface StreamWriterOptions {
  /** Where the stream goes. */
  sink: OrderedSink;
  /** The reorder window: data held out of order plus the sink's staging ring, at most. */
  window: number;
  /** Called once when the writer enters its error state. */
  onFailure?: (message: string) => void;
}

/**
 * The ordering engine of write mode.
 *
 * @example Two writes in the wrong order come out in the right one
 * ```ts
 * import { OrderedSink } from "./ordered_sink.ts";
 * import { StreamWriter } from "./stream_writer.ts";
 * const out: number[] = [];
 * const sink = new OrderedSink(Promise.resolve(new WritableStream({ write: (c) => void out.push(...c) })));
 * const w = new StreamWriter({ sink, window: 1024 });
 * await w.write(new Uint8Array([3, 4]), 2);
 * await w.write(new Uint8Array([1, 2]), 0);
 * await w.finish();
 * console.assert(out.join() === "1,2,3,4");
 * ```
 */
export class StreamWriter extends ErrorState {
  #sink: OrderedSink;
  #window: number;
  #limit: number;
  #held = new ReorderWindow();
  #position = 0;
  #highest = 0;

  /**
   * Create the engine.
   *
   * @param options The sink and the window.
   */
  constructor(options: StreamWriterOptions) {
    super(options.onFailure);
    this.#sink = options.sink;
    this.#window = options.window;
    this.#limit = Math.max(0, options.window - options.sink.stagingBytes);
  }

  /** The stream position: bytes handed to the sink in order. */
  get position(): number {
    return this.#position;
  }

  /** The end of the highest write accepted. */
  get highest(): number {
    return this.#highest;
  }

  /** Data bytes held out of order right now. */
  get held(): number {
    return this.#held.bytes;
  }

  /**
   * Write `buf` at `offset`. Settles when the bytes are in the stream, staged
   * for it, or in the window; `buf` is not used after that.
   *
   * @param buf The bytes.
   * @param offset Their offset in the stream.
   */
  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.#accept(offset, buf.length, buf);
  }

  /**
   * Write `count` zeroes at `offset` (WRITE_ZEROES and TRIM).
   *
   * @param count The number of zero bytes.
   * @param offset Their offset in the stream.
   */
  zero(count: number, offset: number): Promise<void> {
    return this.#accept(offset, count, null);
  }

  /**
   * Release everything held, filling gaps with zeroes, and wait until it is
   * all in the stream.
   */
  async flush(): Promise<void> {
    this.check();
    this.#releaseAll();
    await this.#drained();
  }

  /**
   * Fill `buf` as a read at `offset`: zeroes at or past the highest write,
   * an error behind it (those bytes are gone down the stream).
   *
   * @param buf Where the bytes go.
   * @param offset The offset of the read.
   */
  read(buf: Uint8Array, offset: number): void {
    this.check();
    if (offset >= this.#highest) {
      buf.fill(0);
      return;
    }
    throw new NbdError(
      "EIO",
      `Cannot read back offset ${offset} (${buf.length} bytes): in write mode the bytes before ` +
        `offset ${this.#highest} have been written to the stream`,
    );
  }

  /**
   * At the end: stream everything acknowledged (unless the writer failed),
   * then close the sink so the reader sees the end of the stream.
   */
  async finish(): Promise<void> {
    if (this.failure === null) this.#releaseAll();
    await this.#sink.close();
  }

  /** Enter the error state and fail the request that caused it, with the reason itself. */
  #stop(message: string): never {
    this.fail(message);
    this.check();
    throw new NbdError("EIO", message); // not reached: check() throws
  }

  async #accept(offset: number, length: number, data: Uint8Array | null): Promise<void> {
    for (;;) {
      this.check();
      const end = offset + length;
      if (offset < this.#position) {
        this.#stop(
          `Write at offset ${offset} (${length} bytes) is behind the stream: the first ` +
            `${this.#position} bytes have already been streamed`,
        );
      }
      if (offset === this.#position) {
        this.#position = end;
        this.#highest = Math.max(this.#highest, end);
        const done = data ? this.#sink.stage(data) : this.#sink.writeZeroes(length);
        this.#releaseContiguous();
        try {
          await done;
        } catch {
          this.check(); // the sink's failure became the writer's through onError
          throw new NbdError("EIO", "The stream failed");
        }
        return;
      }
      const growth = this.#held.growth(offset, length, data !== null);
      if (this.#held.count >= MAX_HELD_RANGES) {
        this.#stop(
          `Write at offset ${offset} (${length} bytes) would overflow the reorder window: ` +
            `${this.#held.count} ranges are held waiting for offset ${this.#position}`,
        );
      }
      if (growth > 0 && this.#held.bytes + this.#sink.queuedOwned + growth > this.#limit) {
        // Held bytes already on their way to the pipe free room as the reader
        // reads: wait for that rather than fail.
        if (this.#sink.queuedOwned > 0) {
          await this.#sink.progress();
          continue;
        }
        this.#stop(
          `Write at offset ${offset} (${length} bytes) would overflow the reorder window ` +
            `(window=${formatSize(this.#window)}): ${this.#held.bytes} bytes are held ` +
            `waiting for offset ${this.#position}. The client writes too far out of order, ` +
            `or skips a range without writing zeroes`,
        );
      }
      this.#held.insert(offset, data ? data.slice() : null, length);
      this.#highest = Math.max(this.#highest, end);
      return;
    }
  }

  /** Move held writes that now continue the stream into the sink. */
  #releaseContiguous(): void {
    if (this.#held.count === 0) return;
    for (const r of this.#held.takeFrom(this.#position)) {
      this.#sink.enqueue(r.data, r.length);
      this.#position += r.length;
    }
  }

  /** Move every held write into the sink, with zeroes in the gaps. */
  #releaseAll(): void {
    this.#held.discardBefore(this.#position);
    for (const r of this.#held.takeAll()) {
      if (r.offset > this.#position) this.#sink.enqueue(null, r.offset - this.#position);
      this.#sink.enqueue(r.data, r.length);
      this.#position = r.offset + r.length;
    }
  }

  async #drained(): Promise<void> {
    try {
      await this.#sink.drain();
    } catch {
      this.check();
      throw new NbdError("EIO", "The stream failed");
    }
  }
}
