/**
 * Exact-length reads over a web `ReadableStream` of bytes.
 *
 * @module
 */

/** Thrown when the peer closes the stream before the bytes asked for arrived. */
export class EndOfStream extends Error {
  /** Create the error; `partial` tells whether some bytes of the read had arrived. */
  constructor(readonly partial: boolean) {
    super(partial ? "Connection closed in the middle of a message" : "Connection closed");
    this.name = "EndOfStream";
  }
}

/**
 * Size of the reader's own buffer: one socket read takes in a burst of
 * request headers with their small payloads.
 */
const BUFFER_SIZE = 64 * 1024;

/**
 * Reads of this size or more go straight into the caller's buffer (one copy,
 * from the kernel, on runtimes whose sockets fill BYOB views); smaller ones
 * pass through the reader's buffer so that one socket read serves many.
 */
const DIRECT_MIN = BUFFER_SIZE / 2;

/** Bytes over a plain `ArrayBuffer`, which is what BYOB reads take. */
export type Bytes = Uint8Array<ArrayBuffer>;

/**
 * Reads exact byte counts from a byte stream.
 *
 * A byte stream (`type: "bytes"`, as all the runtime adapters' sockets are) is
 * read with a BYOB reader into the reader's own reused buffer, or for large
 * reads straight into the caller's: no allocation per read. Any other stream
 * of `Uint8Array` chunks works too, through a default reader.
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
  #byob: ReadableStreamBYOBReader | null = null;
  #default: ReadableStreamDefaultReader<Uint8Array> | null = null;
  /** A default reader's chunk not yet taken into the buffer. */
  #chunk: Uint8Array = new Uint8Array(0);
  #buf: Bytes = new Uint8Array(BUFFER_SIZE);
  #start = 0;
  #end = 0;
  #ended = false;

  /** Wrap a stream; the reader holds its lock until {@linkcode ByteReader.release}. */
  constructor(stream: ReadableStream<Uint8Array>) {
    try {
      this.#byob = stream.getReader({ mode: "byob" });
    } catch {
      this.#default = stream.getReader();
    }
  }

  /** Bytes already received and not yet read. */
  get buffered(): number {
    return this.#end - this.#start + this.#chunk.length;
  }

  /**
   * Read up to `into.length` bytes into `into` (at least one unless the
   * stream ended). BYOB reads transfer the memory to a new `ArrayBuffer`:
   * the returned view is the one to use from then on.
   */
  async #pull(into: Bytes): Promise<{ n: number; view: Bytes }> {
    if (this.#byob) {
      if (this.#ended) return { n: 0, view: into };
      const { length, byteOffset } = into; // both read 0 once the read detaches it
      const { value, done } = await this.#byob.read(into);
      if (done) this.#ended = true;
      // A cancelled stream (the server shutting down) keeps the memory it
      // was given and hands back nothing: the bytes held are lost with it,
      // and the caller gets fresh memory of the same size.
      if (!value) return { n: 0, view: new Uint8Array(byteOffset + length).subarray(byteOffset) };
      return { n: value.length, view: new Uint8Array(value.buffer, value.byteOffset, length) };
    }
    while (this.#chunk.length === 0) {
      if (this.#ended) return { n: 0, view: into };
      const { value, done } = await this.#default!.read();
      if (done) this.#ended = true;
      else this.#chunk = value;
    }
    const n = Math.min(into.length, this.#chunk.length);
    into.set(n === this.#chunk.length ? this.#chunk : this.#chunk.subarray(0, n));
    this.#chunk = this.#chunk.subarray(n);
    return { n, view: into };
  }

  /** Receive more bytes into the buffer; false at the end of the stream. */
  async #fill(): Promise<boolean> {
    if (this.#start === this.#end) this.#start = this.#end = 0;
    else if (this.#end === this.#buf.length) {
      this.#buf.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    const { n, view } = await this.#pull(this.#buf.subarray(this.#end));
    this.#buf = new Uint8Array(view.buffer, 0, BUFFER_SIZE);
    this.#end += n;
    return n > 0;
  }

  /**
   * Take exactly `n` bytes if they have already arrived, without waiting:
   * the request loop's fast path, which costs no promise and no microtask
   * turn when a burst of requests sits in the buffer.
   *
   * @param n The byte count (at most 64 KiB).
   * @returns A view of the reader's buffer, valid only until the next call on
   *   the reader, or null when fewer than `n` bytes are buffered (then call
   *   {@linkcode ByteReader.read}).
   */
  take(n: number): Uint8Array | null {
    if (this.#end - this.#start < n) return null;
    const view = this.#buf.subarray(this.#start, this.#start + n);
    this.#start += n;
    return view;
  }

  /**
   * Fill `out` from bytes that have already arrived, without waiting.
   *
   * @param out Where the bytes go.
   * @returns True when `out` was filled; false, with nothing taken, when
   *   fewer bytes are buffered (then call {@linkcode ByteReader.readInto}).
   */
  takeInto(out: Uint8Array): boolean {
    const length = out.length;
    if (this.#end - this.#start < length) return false;
    out.set(this.#buf.subarray(this.#start, this.#start + length));
    this.#start += length;
    return true;
  }

  /**
   * Read exactly `n` bytes.
   *
   * @param n The byte count.
   * @returns The bytes: up to 64 KiB, a view of the reader's buffer that is
   *   valid only until the next call on the reader (copy what must be kept).
   * @throws {EndOfStream} When the stream ends first.
   */
  async read(n: number): Promise<Uint8Array> {
    if (n > BUFFER_SIZE) return await this.readInto(new Uint8Array(n));
    if (this.#end - this.#start < n) {
      if (this.#buf.length - this.#start < n) {
        this.#buf.copyWithin(0, this.#start, this.#end);
        this.#end -= this.#start;
        this.#start = 0;
      }
      while (this.#end - this.#start < n) {
        if (!(await this.#fill())) throw new EndOfStream(this.#end > this.#start);
      }
    }
    const view = this.#buf.subarray(this.#start, this.#start + n);
    this.#start += n;
    return view;
  }

  /**
   * Fill `out` completely.
   *
   * @param out Where the bytes go.
   * @returns `out`, or a view of the same memory when a BYOB read moved it
   *   to a new `ArrayBuffer` (`out` is then detached: use the result).
   * @throws {EndOfStream} When the stream ends first.
   */
  async readInto(out: Bytes): Promise<Bytes> {
    const length = out.length; // a BYOB read detaches `out`: its length reads 0 then
    const have = Math.min(length, this.#end - this.#start);
    out.set(this.#buf.subarray(this.#start, this.#start + have));
    this.#start += have;
    let filled = have;
    while (filled < length) {
      const left = length - filled;
      if (left < DIRECT_MIN) {
        if (this.#start === this.#end && !(await this.#fill())) throw new EndOfStream(filled > 0);
        const take = Math.min(left, this.#end - this.#start);
        out.set(this.#buf.subarray(this.#start, this.#start + take), filled);
        this.#start += take;
        filled += take;
        continue;
      }
      const { n, view } = await this.#pull(out.subarray(filled));
      if (n === 0) throw new EndOfStream(filled > 0);
      out = new Uint8Array(view.buffer, view.byteOffset - filled, length);
      filled += n;
    }
    return out;
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
      if (this.#start === this.#end && !(await this.#fill())) throw new EndOfStream(left < n);
      const take = Math.min(left, this.#end - this.#start);
      this.#start += take;
      left -= take;
    }
  }

  /** Stop reading: cancel the stream. */
  async cancel(): Promise<void> {
    try {
      await (this.#byob ?? this.#default)!.cancel();
    } catch {
      // already errored or closed
    }
  }

  /** Give the stream back (for STARTTLS, which replaces the transport). */
  release(): void {
    (this.#byob ?? this.#default)!.releaseLock();
  }

  /** Bytes received but not read: must be empty when the transport is replaced. */
  leftover(): Uint8Array {
    const buffered = this.#buf.subarray(this.#start, this.#end);
    if (this.#chunk.length === 0) return buffered;
    const all = new Uint8Array(buffered.length + this.#chunk.length);
    all.set(buffered);
    all.set(this.#chunk, buffered.length);
    return all;
  }
}
