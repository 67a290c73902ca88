/**
 * `memory size=SIZE`: a sparse RAM disk, shared by every connection.
 *
 * Memory grows with the data written, not with the size: the disk is a map
 * of 64 KiB pages allocated on first write and freed by TRIM or by zeroing a
 * whole page. Extents report unallocated pages as holes.
 *
 * Large reads are sent straight from the disk's memory, without a copy into
 * the reply: where large writes went, the pages of each 1 MiB are views of
 * one contiguous slab, and a read within a slab is lent to the server (see
 * `LentBytes`). Small writes get pages of their own, so scattered 4 KiB
 * writes still cost 64 KiB each.
 *
 * @module
 */
import { EXTENT_HOLE, EXTENT_ZERO, type Plugin } from "./plugin.ts";
import { parseSize } from "./size.ts";
import { VERSION } from "../version.ts";

const PAGE_SHIFT = 16;
const PAGE = 1 << PAGE_SHIFT;
const SLAB = 1 << 20;
const PAGES_PER_SLAB = SLAB / PAGE;
// A write this large puts the slabs it touches in place: writers of large
// requests (qemu-img, nbdcopy, fio's sequential jobs) fill whole slabs, and
// memory for a slab is then at most 8 times what was written into it.
const SLAB_WRITE_MIN = 2 * PAGE;
// Below this a lent reply costs more than the copy it saves: the server
// copies small replies into its batch anyway, and a loan takes a separate
// header and write.
const LEND_MIN = PAGE;
// Lent for reads of holes; nothing writes into it.
const ZEROES = new Uint8Array(SLAB);

/** A slab: 1 MiB of contiguous memory whose allocated pages are views. */
interface Slab {
  bytes: Uint8Array;
  /** How many of its pages are allocated; at 0 the slab is freed. */
  pages: number;
}

/**
 * A sparse byte array of 64 KiB pages.
 *
 * @example
 * ```ts
 * import { SparseArray } from "./memory.ts";
 * const disk = new SparseArray();
 * disk.write(new Uint8Array(256 * 1024).fill(9), 0);
 * const lent = disk.view(128 * 1024, 65536);
 * console.assert(lent !== undefined && lent[0] === 9);
 * const buf = new Uint8Array(4);
 * disk.read(buf, 1 << 30);
 * console.assert(buf.every((b) => b === 0));
 * ```
 */
export class SparseArray {
  // Every allocated page, standalone or a view of its slab. Where a slab
  // exists, every allocated page of its 1 MiB is a view of it.
  #pages = new Map<number, Uint8Array>();
  #slabs = new Map<number, Slab>();

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

  /**
   * The `count` bytes at `offset` as a view of the disk's own memory, when
   * they lie within one slab (or one unwritten 1 MiB) and are worth lending;
   * otherwise undefined, and `read` copies them. Later writes show through.
   */
  view(count: number, offset: number): Uint8Array | undefined {
    if (count < LEND_MIN) return undefined;
    const index = Math.floor(offset / SLAB);
    const within = offset - index * SLAB;
    if (within + count > SLAB) return undefined;
    const slab = this.#slabs.get(index);
    if (slab) return slab.bytes.subarray(within, within + count);
    const first = index * PAGES_PER_SLAB + Math.floor(within / PAGE);
    const last = index * PAGES_PER_SLAB + Math.floor((within + count - 1) / PAGE);
    for (let p = first; p <= last; p++) if (this.#pages.has(p)) return undefined;
    return ZEROES.subarray(0, count);
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
    if (buf.length >= SLAB_WRITE_MIN) this.#makeSlabs(offset, buf.length);
    const index = Math.floor(offset / PAGE);
    const within = offset - index * PAGE;
    if (within + buf.length <= PAGE) return this.#writePiece(buf, index, within, 0, buf.length);
    this.#pieces(offset, buf.length, (index, within, done, n) => {
      this.#writePiece(buf, index, within, done, n);
    });
  }

  #writePiece(buf: Uint8Array, index: number, within: number, done: number, n: number): void {
    const page = this.#pages.get(index) ?? this.#newPage(index);
    page.set(n === buf.length ? buf : buf.subarray(done, done + n), within);
  }

  #newPage(index: number): Uint8Array {
    const slab = this.#slabs.get(Math.floor(index / PAGES_PER_SLAB));
    let page: Uint8Array;
    if (slab) {
      const at = (index % PAGES_PER_SLAB) * PAGE;
      page = slab.bytes.subarray(at, at + PAGE);
      slab.pages++;
    } else {
      page = new Uint8Array(PAGE);
    }
    this.#pages.set(index, page);
    return page;
  }

  /** Put slabs under the 1 MiB pieces that `count` bytes at `offset` touch. */
  #makeSlabs(offset: number, count: number): void {
    const last = Math.floor((offset + count - 1) / SLAB);
    for (let index = Math.floor(offset / SLAB); index <= last; index++) {
      if (this.#slabs.has(index)) continue;
      this.#slabs.set(index, { bytes: new Uint8Array(SLAB), pages: 0 });
      // Pages that small writes made before move into the slab.
      for (let p = index * PAGES_PER_SLAB; p < (index + 1) * PAGES_PER_SLAB; p++) {
        const page = this.#pages.get(p);
        if (page) this.#newPage(p).set(page);
      }
    }
  }

  /** Make `count` bytes at `offset` zero, freeing whole pages. */
  zero(count: number, offset: number): void {
    this.#pieces(offset, count, (index, within, _done, n) => {
      const page = this.#pages.get(index);
      if (!page) return;
      if (n < PAGE) return page.fill(0, within, within + n);
      this.#pages.delete(index);
      const s = Math.floor(index / PAGES_PER_SLAB);
      const slab = this.#slabs.get(s);
      if (!slab) return;
      // The slab stays zero where no page is allocated: it is lent as it is.
      page.fill(0);
      if (--slab.pages === 0) this.#slabs.delete(s);
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
    configHelp: "size=<SIZE>  (required) Size of the RAM disk, e.g. 1G.\n" +
      "allocator=sparse|malloc  Accepted for nbdkit's command lines; both are sparse here.",
    threadModel: "parallel",
    preadFillsBuffer: true,

    config(key, value) {
      if (key === "allocator") {
        // nbdkit's `malloc` preallocates the whole disk; what a client sees
        // is the same, so its command lines run here as they are, sparse.
        const [name, ...options] = value.split(",");
        if (name === "zstd") throw new Error("allocator=zstd (compressed pages) is not supported");
        if (name !== "sparse" && name !== "malloc") {
          throw new Error(`allocator=${value}: unknown allocator (sparse, malloc)`);
        }
        for (const option of options) {
          if (name !== "malloc" || !/^mlock=/.test(option)) {
            throw new Error(`allocator=${value}: unknown option '${option}'`);
          }
        }
        return;
      }
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
      const bytes = disk.view(buf.length, offset);
      if (bytes) return { bytes };
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
