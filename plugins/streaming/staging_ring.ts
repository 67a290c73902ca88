/**
 * A fixed buffer handed out in first-in, first-out order: the staging area
 * where in-order writes wait for the pipe after they were acknowledged.
 *
 * One allocation, reused for the whole stream, so a long stream costs no
 * garbage and no fresh pages; pieces are freed in the order they were
 * allocated, which is the order the stream writes them.
 *
 * @module
 */

/**
 * A circular first-in, first-out allocator over one buffer.
 *
 * @example
 * ```ts
 * import { StagingRing } from "./staging_ring.ts";
 * const ring = new StagingRing(8);
 * const a = ring.alloc(5)!;
 * console.assert(ring.alloc(4) === null); // only 3 bytes left
 * ring.free(a);
 * console.assert(ring.alloc(8)!.length === 8);
 * ```
 */
export class StagingRing {
  #size: number;
  #buf: Uint8Array | null = null;
  #head = 0;
  #tail = 0;
  #wrapEnd = 0;
  #wrapped = false;
  #used = 0;

  /**
   * Create a ring; its memory is allocated on first use.
   *
   * @param size The capacity in bytes (0 disables staging).
   */
  constructor(size: number) {
    this.#size = size;
  }

  /** The capacity in bytes. */
  get size(): number {
    return this.#size;
  }

  /** Bytes allocated and not freed. */
  get used(): number {
    return this.#used;
  }

  /**
   * Allocate `n` contiguous bytes after every piece still allocated.
   *
   * @param n The byte count.
   * @returns A view of the ring, or null when there is no room now.
   */
  alloc(n: number): Uint8Array | null {
    if (n > this.#size || n === 0) return null;
    if (this.#used === 0) {
      this.#head = this.#tail = 0;
      this.#wrapped = false;
    }
    let at: number;
    if (!this.#wrapped) {
      if (this.#size - this.#head >= n) {
        at = this.#head;
      } else if (this.#tail >= n) {
        // Start again at the beginning; the end stays unused until the tail passes it.
        this.#wrapped = true;
        this.#wrapEnd = this.#head;
        at = 0;
      } else {
        return null;
      }
    } else if (this.#tail - this.#head >= n) {
      at = this.#head;
    } else {
      return null;
    }
    this.#buf ??= new Uint8Array(this.#size);
    this.#head = at + n;
    this.#used += n;
    return this.#buf.subarray(at, at + n);
  }

  /**
   * Free the oldest allocated piece.
   *
   * @param piece The view {@linkcode StagingRing.alloc} returned, oldest first.
   */
  free(piece: Uint8Array): void {
    const start = piece.byteOffset;
    if (start !== this.#tail) {
      throw new Error(
        `Staging ring freed out of order: ${start} is not the oldest (${this.#tail})`,
      );
    }
    this.#tail = start + piece.length;
    this.#used -= piece.length;
    if (this.#wrapped && this.#tail === this.#wrapEnd) {
      this.#wrapped = false;
      this.#tail = 0;
    }
    if (this.#used === 0) this.#head = this.#tail = 0;
  }
}
