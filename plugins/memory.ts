/**
 * `memory size=SIZE`: a sparse RAM disk, shared by every connection.
 *
 * Memory grows with the data written, not with the size: the disk is a map
 * of 64 KiB pages allocated on first write and freed by TRIM or by zeroing a
 * whole page. Extents report unallocated pages as holes.
 *
 * @module
 */
import { EXTENT_HOLE, EXTENT_ZERO, type Plugin } from "./plugin.ts";
import { parseSize } from "./size.ts";
import { VERSION } from "../version.ts";

const PAGE_SHIFT = 16;
const PAGE = 1 << PAGE_SHIFT;

/** A sparse byte array of 64 KiB pages. */
export class SparseArray {
  #pages = new Map<number, Uint8Array>();

  /** Pages allocated. */
  get allocatedPages(): number {
    return this.#pages.size;
  }

  /**
   * Walk `count` bytes at `offset` page by page: `fn` gets the page's index,
   * where in the page the piece starts, how far into the range, and its length.
   */
  #pieces(
    offset: number,
    count: number,
    fn: (index: number, within: number, done: number, n: number) => void,
  ): void {
    for (let done = 0; done < count;) {
      const at = offset + done;
      const index = Math.floor(at / PAGE);
      const within = at - index * PAGE;
      const n = Math.min(PAGE - within, count - done);
      fn(index, within, done, n);
      done += n;
    }
  }

  /** Copy bytes at `offset` into `buf`; missing pages read as zeroes. */
  read(buf: Uint8Array, offset: number): void {
    const index = Math.floor(offset / PAGE);
    const within = offset - index * PAGE;
    // Within one page (most small requests): no walk, and no closure for it.
    if (within + buf.length <= PAGE) return this.#readPiece(buf, index, within, 0, buf.length);
    this.#pieces(offset, buf.length, (index, within, done, n) => {
      this.#readPiece(buf, index, within, done, n);
    });
  }

  #readPiece(buf: Uint8Array, index: number, within: number, done: number, n: number): void {
    const page = this.#pages.get(index);
    if (page) buf.set(page.subarray(within, within + n), done);
    else buf.fill(0, done, done + n);
  }

  /** Copy `buf` to `offset`, allocating pages. */
  write(buf: Uint8Array, offset: number): void {
    const index = Math.floor(offset / PAGE);
    const within = offset - index * PAGE;
    if (within + buf.length <= PAGE) return this.#writePiece(buf, index, within, 0, buf.length);
    this.#pieces(offset, buf.length, (index, within, done, n) => {
      this.#writePiece(buf, index, within, done, n);
    });
  }

  #writePiece(buf: Uint8Array, index: number, within: number, done: number, n: number): void {
    let page = this.#pages.get(index);
    if (!page) this.#pages.set(index, page = new Uint8Array(PAGE));
    page.set(n === buf.length ? buf : buf.subarray(done, done + n), within);
  }

  /** Make `count` bytes at `offset` zero, freeing whole pages. */
  zero(count: number, offset: number): void {
    this.#pieces(offset, count, (index, within, _done, n) => {
      const page = this.#pages.get(index);
      if (!page) return;
      if (n === PAGE) this.#pages.delete(index);
      else page.fill(0, within, within + n);
    });
  }

  /** Whether the page holding `offset` is allocated. */
  allocated(offset: number): boolean {
    return this.#pages.has(Math.floor(offset / PAGE));
  }
}

/**
 * Create a memory plugin with its own disk (the default export is one such).
 *
 * @returns A fresh, unconfigured plugin.
 *
 * @example
 * ```ts
 * import { createMemoryPlugin } from "./memory.ts";
 * const plugin = createMemoryPlugin();
 * await plugin.config!("size", "1M");
 * await plugin.configComplete!();
 * console.assert(await plugin.getSize(null) === 1048576n);
 * ```
 */
export function createMemoryPlugin(): Plugin<null> {
  let size = -1n;
  let disk = new SparseArray();
  return {
    name: "memory",
    longname: "nbdkit-ts memory plugin",
    version: VERSION,
    magicConfigKey: "size",
    configHelp: "size=<SIZE>  (required) Size of the RAM disk, e.g. 1G.",
    threadModel: "parallel",
    preadFillsBuffer: true,

    config(key, value) {
      if (key !== "size") throw new Error(`unknown parameter '${key}'`);
      size = parseSize(value);
    },

    configComplete() {
      if (size < 0n) throw new Error("you must specify size=<SIZE> on the command line");
      if (size > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new Error(`size=${size} is larger than this plugin supports (2^53 - 1)`);
      }
      disk = new SparseArray();
    },

    open: () => null,
    getSize: () => size,
    canMultiConn: () => true,
    canFua: () => "native",
    canCache: () => "native",
    canFastZero: () => true,

    pread(_h, buf, offset) {
      disk.read(buf, offset);
    },
    pwrite(_h, buf, offset) {
      disk.write(buf, offset);
    },
    flush() {},
    trim(_h, count, offset) {
      disk.zero(count, offset);
    },
    zero(_h, count, offset) {
      disk.zero(count, offset);
    },
    cache() {},

    extents(_h, count, offset, _flags, sink) {
      const end = offset + count;
      let pos = offset;
      while (pos < end) {
        const next = Math.min((Math.floor(pos / PAGE) + 1) * PAGE, end);
        sink.add(pos, next - pos, disk.allocated(pos) ? 0 : EXTENT_HOLE | EXTENT_ZERO);
        pos = next;
      }
    },
  };
}

/** The memory plugin, as `nbdkit-ts memory` loads it. */
export default createMemoryPlugin();
