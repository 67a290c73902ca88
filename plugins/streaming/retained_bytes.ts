/**
 * What read mode keeps of a stream it has consumed: the first bytes (format
 * probes read sector 0 more than once, whenever they like) and the most
 * recent window (parallel clients read slightly out of order).
 *
 * Chunks are kept as the stream delivered them, without copying, except
 * for the head, which is copied once, and chunks that fill less than half
 * of their buffer: a pipe read while its writer trickles returns a few KiB
 * in a 64 KiB buffer, and a window of such chunks held 16 times its size.
 *
 * @module
 */

interface Chunk {
  offset: number;
  data: Uint8Array;
}

/**
 * The retained bytes of a stream.
 *
 * @example
 * ```ts
 * import { RetainedBytes } from "./retained_bytes.ts";
 * const r = new RetainedBytes(2, 4);
 * for (let i = 0; i < 10; i++) r.append(new Uint8Array([i]));
 * const buf = new Uint8Array(2);
 * console.assert(r.copyOut(buf, 0) && buf.join() === "0,1"); // the head
 * console.assert(r.copyOut(buf, 8) && buf.join() === "8,9"); // the recent window
 * console.assert(!r.copyOut(buf, 3)); // gone
 * ```
 */
export class RetainedBytes {
  #headSize: number;
  #window: number;
  #head: Uint8Array | null = null;
  #headFill = 0;
  #chunks: Chunk[] = [];
  #first = 0;
  #bytes = 0;
  #end = 0;
  #onRelease: ((buffer: ArrayBufferLike) => void) | undefined;

  /**
   * Create an empty store.
   *
   * @param headSize How many bytes from the start of the stream are kept.
   * @param window How many of the most recent bytes are kept (at least).
   * @param onRelease Given each chunk's buffer once nothing is read from it
   *   any more (it left the window, or its bytes were copied), for reuse.
   */
  constructor(
    headSize: number,
    window: number,
    onRelease?: (buffer: ArrayBufferLike) => void,
  ) {
    this.#headSize = headSize;
    this.#window = window;
    this.#onRelease = onRelease;
  }

  /** Bytes consumed from the stream so far (the offset of the next byte). */
  get end(): number {
    return this.#end;
  }

  /** The oldest offset of the recent window. */
  get recentStart(): number {
    return this.#first < this.#chunks.length ? this.#chunks[this.#first].offset : this.#end;
  }

  /**
   * Add the next chunk of the stream; the store now owns it.
   *
   * @param data The bytes.
   */
  append(data: Uint8Array): void {
    if (data.length === 0) return this.#onRelease?.(data.buffer);
    if (data.length * 2 < data.buffer.byteLength) {
      const whole = data.buffer;
      data = data.slice();
      this.#onRelease?.(whole);
    }
    if (this.#end < this.#headSize) {
      this.#head ??= new Uint8Array(this.#headSize);
      const n = Math.min(data.length, this.#headSize - this.#end);
      this.#head.set(data.subarray(0, n), this.#end);
      this.#headFill = this.#end + n;
    }
    this.#chunks.push({ offset: this.#end, data });
    this.#end += data.length;
    this.#bytes += data.length;
    while (
      this.#chunks.length - this.#first > 1 &&
      this.#bytes - this.#chunks[this.#first].data.length >= this.#window
    ) {
      const gone = this.#chunks[this.#first].data;
      this.#bytes -= gone.length;
      this.#first++;
      this.#onRelease?.(gone.buffer);
    }
    if (this.#first > 1024 && this.#first * 2 > this.#chunks.length) {
      this.#chunks.splice(0, this.#first);
      this.#first = 0;
    }
  }

  /**
   * Copy the bytes at `offset` into `buf`, if they are all still kept.
   *
   * @param buf Where the bytes go.
   * @param offset The offset of the first byte.
   * @returns False when some of the bytes were never consumed or are gone.
   */
  copyOut(buf: Uint8Array, offset: number): boolean {
    const end = offset + buf.length;
    if (end > this.#end) return false;
    let pos = offset;
    if (pos < this.#headFill) {
      const n = Math.min(end, this.#headFill) - pos;
      buf.set(this.#head!.subarray(pos, pos + n));
      pos += n;
    }
    if (pos === end) return true;
    if (pos < this.recentStart) return false;
    for (let i = this.#chunkAt(pos); pos < end; i++) {
      const c = this.#chunks[i];
      const from = pos - c.offset;
      const n = Math.min(c.data.length - from, end - pos);
      buf.set(c.data.subarray(from, from + n), pos - offset);
      pos += n;
    }
    return true;
  }

  /** Index of the kept chunk holding `offset` (binary search). */
  #chunkAt(offset: number): number {
    let lo = this.#first;
    let hi = this.#chunks.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (this.#chunks[mid].offset <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }
}
