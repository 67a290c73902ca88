/**
 * Exact-length reads over a web `ReadableStream` of byte chunks.
 *
 * @module
 */

const EMPTY = new Uint8Array(0);

/** Thrown when the peer closes the stream before the bytes asked for arrived. */
export class EndOfStream extends Error {
  /** Create the error; `partial` tells whether some bytes of the read had arrived. */
  constructor(readonly partial: boolean) {
    super(partial ? "Connection closed in the middle of a message" : "Connection closed");
    this.name = "EndOfStream";
  }
}

/**
 * Reads exact byte counts from a stream of chunks. A read that fits in the
 * current chunk returns a view of it (no copy); chunks are never reused by
 * the runtimes' socket streams, so views stay valid.
 *
 * @example
 * ```ts
 * import { ByteReader } from "./byte_reader.ts";
 * const stream = ReadableStream.from([new Uint8Array([1, 2]), new Uint8Array([3])]);
 * const reader = new ByteReader(stream);
 * const bytes = await reader.read(3);
 * console.assert(bytes.join() === "1,2,3");
 * ```
 */
export class ByteReader {
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #chunk: Uint8Array = EMPTY;
  #pos = 0;

  /** Wrap a stream; the reader holds its lock until {@linkcode ByteReader.release}. */
  constructor(stream: ReadableStream<Uint8Array>) {
    this.#reader = stream.getReader();
  }

  /** Bytes already received and not yet read. */
  get buffered(): number {
    return this.#chunk.length - this.#pos;
  }

  async #next(): Promise<boolean> {
    while (true) {
      const { value, done } = await this.#reader.read();
      if (done) return false;
      if (value.length > 0) {
        this.#chunk = value;
        this.#pos = 0;
        return true;
      }
    }
  }

  /**
   * Read exactly `n` bytes.
   *
   * @param n The byte count.
   * @returns The bytes (a view when possible).
   * @throws {EndOfStream} When the stream ends first.
   */
  async read(n: number): Promise<Uint8Array> {
    if (this.#chunk.length - this.#pos >= n) {
      const view = this.#chunk.subarray(this.#pos, this.#pos + n);
      this.#pos += n;
      return view;
    }
    const out = new Uint8Array(n);
    await this.readInto(out);
    return out;
  }

  /**
   * Fill `out` completely.
   *
   * @param out Where the bytes go.
   * @throws {EndOfStream} When the stream ends first.
   */
  async readInto(out: Uint8Array): Promise<void> {
    let filled = 0;
    while (filled < out.length) {
      if (this.#pos >= this.#chunk.length && !(await this.#next())) {
        throw new EndOfStream(filled > 0);
      }
      const take = Math.min(out.length - filled, this.#chunk.length - this.#pos);
      out.set(this.#chunk.subarray(this.#pos, this.#pos + take), filled);
      this.#pos += take;
      filled += take;
    }
  }

  /**
   * Discard exactly `n` bytes without holding them.
   *
   * @param n The byte count (may exceed 2^32).
   * @throws {EndOfStream} When the stream ends first.
   */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this.#pos >= this.#chunk.length && !(await this.#next())) {
        throw new EndOfStream(left < n);
      }
      const take = Math.min(left, this.#chunk.length - this.#pos);
      this.#pos += take;
      left -= take;
    }
  }

  /** Stop reading: cancel the stream. */
  async cancel(): Promise<void> {
    try {
      await this.#reader.cancel();
    } catch {
      // already errored or closed
    }
  }

  /** Give the stream back (for STARTTLS, which replaces the transport). */
  release(): ReadableStream<Uint8Array> | void {
    this.#reader.releaseLock();
  }

  /** Bytes received but not read: must be empty when the transport is replaced. */
  leftover(): Uint8Array {
    return this.#chunk.subarray(this.#pos);
  }
}
