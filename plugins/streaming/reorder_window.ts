/**
 * The reorder window of the streaming plugin: writes that arrived ahead of
 * the stream position, held until the bytes before them have been streamed.
 *
 * Pure bookkeeping, no I/O. Ranges are kept sorted and disjoint; a later
 * write over an earlier held one replaces the overlapped bytes, as it would
 * on a disk. Zero runs (WRITE_ZEROES, TRIM) are held without memory.
 *
 * @module
 */

/** A held range: data, or a run of zeroes when `data` is null. */
export interface HeldRange {
  /** Offset of the first byte in the stream. */
  offset: number;
  /** Number of bytes. */
  length: number;
  /** The bytes (owned by the window), or null for zeroes. */
  data: Uint8Array | null;
}

/**
 * Writes held out of order, sorted by offset, never overlapping.
 *
 * @example Two writes arrive in the wrong order
 * ```ts
 * import { ReorderWindow } from "./reorder_window.ts";
 * const w = new ReorderWindow();
 * w.insert(4, new Uint8Array([5, 6]));
 * console.assert(w.takeFrom(0).length === 0); // bytes 0..3 have not arrived
 * w.insert(2, new Uint8Array([3, 4]));
 * console.assert(w.takeFrom(2).length === 2); // 2..3 and 4..5, in order
 * ```
 */
export class ReorderWindow {
  #ranges: HeldRange[] = [];
  #bytes = 0;

  /** Bytes of data held (zero runs cost nothing). */
  get bytes(): number {
    return this.#bytes;
  }

  /** Number of held ranges. */
  get count(): number {
    return this.#ranges.length;
  }

  /** The end of the last held range, or 0 when nothing is held. */
  get end(): number {
    const last = this.#ranges[this.#ranges.length - 1];
    return last ? last.offset + last.length : 0;
  }

  /** The offset of the first held range, or undefined when nothing is held. */
  get first(): number | undefined {
    return this.#ranges[0]?.offset;
  }

  /**
   * How many data bytes the window would grow by if `length` bytes at
   * `offset` were inserted (negative when zeroes replace held data).
   *
   * @param offset Offset of the write.
   * @param length Its length.
   * @param isData False for a zero run.
   * @returns The change in {@linkcode ReorderWindow.bytes}.
   */
  growth(offset: number, length: number, isData: boolean): number {
    const end = offset + length;
    let replaced = 0;
    for (let i = this.#firstEndingAfter(offset); i < this.#ranges.length; i++) {
      const r = this.#ranges[i];
      if (r.offset >= end) break;
      if (r.data) replaced += Math.min(end, r.offset + r.length) - Math.max(offset, r.offset);
    }
    return (isData ? length : 0) - replaced;
  }

  /**
   * Hold `data` (which the window now owns) at `offset`, or a run of
   * `length` zeroes when `data` is null.
   *
   * @param offset Offset in the stream.
   * @param data The bytes, or null for zeroes.
   * @param length The length of a zero run (ignored for data).
   */
  insert(offset: number, data: Uint8Array | null, length = data?.length ?? 0): void {
    const len = data ? data.length : length;
    if (len === 0) return;
    this.#cut(offset, offset + len);
    const at = this.#firstEndingAfter(offset);
    this.#ranges.splice(at, 0, { offset, length: len, data });
    if (data) this.#bytes += len;
  }

  /**
   * Forget every held byte before `position` (the stream has moved past it).
   *
   * @param position The stream position.
   */
  discardBefore(position: number): void {
    if (this.#ranges.length > 0 && this.#ranges[0].offset < position) this.#cut(0, position);
  }

  /**
   * Remove and return the ranges that continue the stream at `position`
   * without a gap, in order. Anything before `position` is discarded first.
   *
   * @param position The stream position.
   * @returns The contiguous ranges starting exactly at `position`.
   */
  takeFrom(position: number): HeldRange[] {
    this.discardBefore(position);
    let n = 0;
    let pos = position;
    while (n < this.#ranges.length && this.#ranges[n].offset === pos) {
      pos += this.#ranges[n].length;
      n++;
    }
    return this.#remove(n);
  }

  /**
   * Remove and return every held range, in order (gaps between them are the
   * caller's to fill).
   *
   * @returns All held ranges.
   */
  takeAll(): HeldRange[] {
    return this.#remove(this.#ranges.length);
  }

  #remove(n: number): HeldRange[] {
    const out = this.#ranges.splice(0, n);
    for (const r of out) if (r.data) this.#bytes -= r.length;
    return out;
  }

  /** Index of the first range ending after `offset` (binary search). */
  #firstEndingAfter(offset: number): number {
    let lo = 0;
    let hi = this.#ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const r = this.#ranges[mid];
      if (r.offset + r.length <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Remove the bytes in [start, end) from held ranges, splitting where needed. */
  #cut(start: number, end: number): void {
    const i = this.#firstEndingAfter(start);
    const keep: HeldRange[] = [];
    let j = i;
    for (; j < this.#ranges.length; j++) {
      const r = this.#ranges[j];
      const rEnd = r.offset + r.length;
      if (r.offset >= end) break;
      if (r.data) this.#bytes -= r.length;
      // Pieces are copied, not viewed, so a small remainder never pins a large buffer.
      if (r.offset < start) keep.push(piece(r, r.offset, start));
      if (rEnd > end) keep.push(piece(r, end, rEnd));
    }
    for (const k of keep) if (k.data) this.#bytes += k.length;
    this.#ranges.splice(i, j - i, ...keep);
  }
}

function piece(r: HeldRange, from: number, to: number): HeldRange {
  return {
    offset: from,
    length: to - from,
    data: r.data ? r.data.slice(from - r.offset, to - r.offset) : null,
  };
}
