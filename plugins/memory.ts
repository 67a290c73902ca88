/**
 * `memory size=SIZE`: a sparse RAM disk, shared by every connection.
 *
 * Memory grows with the data written, not with the size. Small writes get
 * 4 KiB pages of their own, so scattered 4 KiB writes cost about what they
 * wrote (nbdkit's pages are 32 KiB). A large write (128 KiB or more) puts
 * one contiguous 1 MiB slab under each megabyte it touches, whose pages
 * are then parts of the slab; large reads within a slab are sent straight
 * from it, without a copy into the reply (see `LentBytes`).
 *
 * A page that TRIM or WRITE_ZEROES leaves all zero is freed, so extents
 * report it as a hole, as nbdkit's do. Extents skip unwritten gigabytes and
 * megabytes whole.
 *
 * @module
 */
import { EXTENT_HOLE, EXTENT_ZERO, type Plugin } from "./plugin.ts";
import { parseSize } from "./size.ts";
import { VERSION } from "../version.ts";

const PAGE = 4096;
const SLAB = 1 << 20;
const PAGES_PER_SLAB = SLAB / PAGE;
const GIB = 1 << 30;
// A write this large puts the slabs it touches in place: writers of large
// requests (qemu-img, nbdcopy, fio's sequential jobs) fill whole slabs, and
// memory for a slab is then at most 8 times what was written into it.
const SLAB_WRITE_MIN = 128 * 1024;
// Below this a lent reply costs more than the copy it saves: the server
// copies small replies into its batch anyway, and a loan takes a separate
// header and write.
const LEND_MIN = 64 * 1024;
// Lent for reads of holes; nothing writes into it.
const ZEROES = new Uint8Array(SLAB);

/** A slab: 1 MiB of contiguous memory, zero where no page is allocated. */
interface Slab {
  bytes: Uint8Array;
  /** 1 for each allocated page. */
  used: Uint8Array;
  /** How many pages are allocated; at 0 the slab is freed. */
  count: number;
}

/** Whether 4 KiB at `at` in `bytes` (4-byte aligned) are all zero. */
function isZeroPage(bytes: Uint8Array, at: number): boolean {
  const words = new Int32Array(bytes.buffer, bytes.byteOffset + at, PAGE / 4);
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
  return true;
}

/** Receives extents: `start`, `length`, NBD extent type. */
type ExtentSink = (start: number, length: number, type: number) => void;

/**
 * A sparse byte array: 4 KiB pages, and 1 MiB slabs where large writes went.
 *
 * @example
 * ```ts
 * import { SparseArray } from "./memory.ts";
 * const disk = new SparseArray();
 * disk.write(new Uint8Array(256 * 1024).fill(9), 0);
 * const lent = disk.view(65536, 128 * 1024);
 * console.assert(lent !== undefined && lent[0] === 9);
 * const buf = new Uint8Array(4);
 * disk.read(buf, 1 << 30);
 * console.assert(buf.every((b) => b === 0));
 * ```
 */
export class SparseArray {
  #slabs = new Map<number, Slab>();
  // Pages of their own, only in megabytes without a slab.
  #pages = new Map<number, Uint8Array>();
  // How many pages of their own each megabyte has, and how many pages
  // (either kind) each gigabyte: what extents and zeroes may skip.
  #inSlab = new Map<number, number>();
  #inGiB = new Map<number, number>();
  #count = 0;

  /** Pages (4 KiB) allocated. */
  get allocatedPages(): number {
    return this.#count;
  }

  #counted(page: number, by: number): void {
    this.#count += by;
    const g = Math.floor(page / (GIB / PAGE));
    const n = (this.#inGiB.get(g) ?? 0) + by;
    if (n === 0) this.#inGiB.delete(g);
    else this.#inGiB.set(g, n);
  }

  #ownPages(slab: number, by: number): void {
    const n = (this.#inSlab.get(slab) ?? 0) + by;
    if (n === 0) this.#inSlab.delete(slab);
    else this.#inSlab.set(slab, n);
  }

  /**
   * Walk `count` bytes at `offset` megabyte by megabyte: `fn` gets the
   * megabyte's index, where in it the piece starts, how far into the range,
   * and its length.
   */
  #slabPieces(
    offset: number,
    count: number,
    fn: (index: number, within: number, done: number, n: number) => void,
  ): void {
    for (let done = 0; done < count;) {
      const at = offset + done;
      const index = Math.floor(at / SLAB);
      const within = at - index * SLAB;
      const n = Math.min(SLAB - within, count - done);
      fn(index, within, done, n);
      done += n;
    }
  }

  /** The same, page by page within one megabyte (`index`) without a slab. */
  #pagePieces(
    index: number,
    within: number,
    count: number,
    fn: (page: number, inPage: number, done: number, n: number) => void,
  ): void {
    for (let done = 0; done < count;) {
      const at = within + done;
      const p = Math.floor(at / PAGE);
      const inPage = at - p * PAGE;
      const n = Math.min(PAGE - inPage, count - done);
      fn(index * PAGES_PER_SLAB + p, inPage, done, n);
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
    if (this.#inSlab.has(index)) {
      const first = index * PAGES_PER_SLAB + Math.floor(within / PAGE);
      const last = index * PAGES_PER_SLAB + Math.floor((within + count - 1) / PAGE);
      for (let p = first; p <= last; p++) if (this.#pages.has(p)) return undefined;
    }
    return ZEROES.subarray(0, count);
  }

  /** Copy bytes at `offset` into `buf`; missing pages read as zeroes. */
  read(buf: Uint8Array, offset: number): void {
    const index = Math.floor(offset / SLAB);
    const within = offset - index * SLAB;
    // Within one megabyte (most requests): no walk, and no closure for it.
    if (within + buf.length <= SLAB) return this.#readSlab(buf, index, within, 0, buf.length);
    this.#slabPieces(offset, buf.length, (index, within, done, n) => {
      this.#readSlab(buf, index, within, done, n);
    });
  }

  #readSlab(buf: Uint8Array, index: number, within: number, done: number, n: number): void {
    const slab = this.#slabs.get(index);
    if (slab) {
      buf.set(slab.bytes.subarray(within, within + n), done);
    } else if (!this.#inSlab.has(index)) {
      buf.fill(0, done, done + n);
    } else {
      this.#pagePieces(index, within, n, (p, inPage, d, m) => {
        const page = this.#pages.get(p);
        if (page) buf.set(page.subarray(inPage, inPage + m), done + d);
        else buf.fill(0, done + d, done + d + m);
      });
    }
  }

  /** Copy `buf` to `offset`, allocating pages. */
  write(buf: Uint8Array, offset: number): void {
    if (buf.length >= SLAB_WRITE_MIN) this.#makeSlabs(offset, buf.length);
    const index = Math.floor(offset / SLAB);
    const within = offset - index * SLAB;
    if (within + buf.length <= SLAB) return this.#writeSlab(buf, index, within, 0, buf.length);
    this.#slabPieces(offset, buf.length, (index, within, done, n) => {
      this.#writeSlab(buf, index, within, done, n);
    });
  }

  #writeSlab(buf: Uint8Array, index: number, within: number, done: number, n: number): void {
    const piece = n === buf.length ? buf : buf.subarray(done, done + n);
    const slab = this.#slabs.get(index);
    if (slab) {
      slab.bytes.set(piece, within);
      const last = Math.floor((within + n - 1) / PAGE);
      for (let p = Math.floor(within / PAGE); p <= last; p++) {
        if (slab.used[p]) continue;
        slab.used[p] = 1;
        slab.count++;
        this.#counted(index * PAGES_PER_SLAB + p, 1);
      }
      return;
    }
    this.#pagePieces(index, within, n, (p, inPage, d, m) => {
      let page = this.#pages.get(p);
      if (!page) {
        page = new Uint8Array(PAGE);
        this.#pages.set(p, page);
        this.#ownPages(index, 1);
        this.#counted(p, 1);
      }
      page.set(m === piece.length ? piece : piece.subarray(d, d + m), inPage);
    });
  }

  /** Put slabs under the 1 MiB pieces that `count` bytes at `offset` touch. */
  #makeSlabs(offset: number, count: number): void {
    const last = Math.floor((offset + count - 1) / SLAB);
    for (let index = Math.floor(offset / SLAB); index <= last; index++) {
      if (this.#slabs.has(index)) continue;
      const slab = { bytes: new Uint8Array(SLAB), used: new Uint8Array(PAGES_PER_SLAB), count: 0 };
      this.#slabs.set(index, slab);
      if (!this.#inSlab.has(index)) continue;
      // Pages that small writes made before move into the slab (still counted).
      for (let p = 0; p < PAGES_PER_SLAB; p++) {
        const page = this.#pages.get(index * PAGES_PER_SLAB + p);
        if (!page) continue;
        slab.bytes.set(page, p * PAGE);
        slab.used[p] = 1;
        slab.count++;
        this.#pages.delete(index * PAGES_PER_SLAB + p);
      }
      this.#inSlab.delete(index);
    }
  }

  /** Make `count` bytes at `offset` zero, freeing the pages left all zero. */
  zero(count: number, offset: number): void {
    this.#slabPieces(offset, count, (index, within, _done, n) => {
      const slab = this.#slabs.get(index);
      if (slab) return this.#zeroSlab(slab, index, within, n);
      if (!this.#inSlab.has(index)) return;
      this.#pagePieces(index, within, n, (p, inPage, _d, m) => {
        const page = this.#pages.get(p);
        if (!page) return;
        if (m < PAGE) {
          page.fill(0, inPage, inPage + m);
          if (!isZeroPage(page, 0)) return;
        }
        this.#pages.delete(p);
        this.#ownPages(index, -1);
        this.#counted(p, -1);
      });
    });
  }

  #zeroSlab(slab: Slab, index: number, within: number, n: number): void {
    // The slab stays zero where no page is allocated: it is lent as it is.
    slab.bytes.fill(0, within, within + n);
    const last = Math.floor((within + n - 1) / PAGE);
    for (let p = Math.floor(within / PAGE); p <= last; p++) {
      if (!slab.used[p]) continue;
      const whole = p * PAGE >= within && (p + 1) * PAGE <= within + n;
      if (!whole && !isZeroPage(slab.bytes, p * PAGE)) continue;
      slab.used[p] = 0;
      slab.count--;
      this.#counted(index * PAGES_PER_SLAB + p, -1);
    }
    if (slab.count === 0) this.#slabs.delete(index);
  }

  /** Whether the page holding `offset` is allocated. */
  allocated(offset: number): boolean {
    const page = Math.floor(offset / PAGE);
    const slab = this.#slabs.get(Math.floor(page / PAGES_PER_SLAB));
    return slab ? slab.used[page % PAGES_PER_SLAB] === 1 : this.#pages.has(page);
  }

  /**
   * The extents of `count` bytes at `offset`, merged: allocated pages as data
   * (0), the rest as holes that read as zeroes. Unwritten gigabytes and
   * megabytes are passed over whole.
   */
  extents(count: number, offset: number, add: ExtentSink): void {
    const end = offset + count;
    let runStart = offset;
    let runType = -1;
    const emit = (to: number, type: number) => {
      if (type !== runType) {
        if (runType >= 0) add(runStart, pos - runStart, runType);
        runStart = pos;
        runType = type;
      }
      pos = to;
    };
    const hole = EXTENT_HOLE | EXTENT_ZERO;
    let pos = offset;
    while (pos < end) {
      const gibEnd = Math.min((Math.floor(pos / GIB) + 1) * GIB, end);
      if (!this.#inGiB.has(Math.floor(pos / GIB))) {
        emit(gibEnd, hole);
        continue;
      }
      while (pos < gibEnd) {
        const index = Math.floor(pos / SLAB);
        const slabEnd = Math.min((index + 1) * SLAB, gibEnd);
        const slab = this.#slabs.get(index);
        if (!slab && !this.#inSlab.has(index)) {
          emit(slabEnd, hole);
          continue;
        }
        while (pos < slabEnd) {
          const page = Math.floor(pos / PAGE);
          const pageEnd = Math.min((page + 1) * PAGE, slabEnd);
          const used = slab ? slab.used[page % PAGES_PER_SLAB] === 1 : this.#pages.has(page);
          emit(pageEnd, used ? 0 : hole);
        }
      }
    }
    if (runType >= 0) add(runStart, pos - runStart, runType);
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
      disk.extents(count, offset, (start, length, type) => sink.add(start, length, type));
    },
  };
}

/** The memory plugin, as `nbdkit-ts memory` loads it. */
export default createMemoryPlugin();
