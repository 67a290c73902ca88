/**
 * How reads become `virDomainBlockPeek` calls on one libvirt connection.
 *
 * - A read is cut into peeks of at most `peekMax` bytes (1 MiB: libvirtd
 *   spends the least CPU per byte on peeks of that size; measured on
 *   libvirt 9.0, 1 GiB in 256 KiB peeks cost libvirtd 0.71 s of CPU, in
 *   1 MiB peeks 0.49 s, in 4 MiB peeks 0.83 s).
 * - At most `limit` peeks are in flight; libvirtd serves 5 calls of one
 *   client at a time (`max_client_requests`), so more would only wait there.
 * - Reads that wait their turn are merged with the waiting reads that
 *   continue them on the same disk, up to `peekMax`: a client sending many
 *   256 KiB reads at once is served in 1 MiB peeks. A merged peek lands in a
 *   buffer of its own, and each read gets its part of it lent (not copied)
 *   for its reply; the buffer is reused once every part is released.
 * - A connection that refuses a large peek (very old libvirt daemons allow
 *   64 KiB) is retried once in 64 KiB peeks, and kept to them if that works.
 *
 * @module
 */
import type { LentBytes } from "../plugin.ts";
import type { LibvirtDomain } from "./bindings.ts";

/** The peek size aimed at. */
export const PEEK_SIZE = 1024 * 1024;
/** The largest peek the remote protocol allows (`REMOTE_DOMAIN_BLOCK_PEEK_BUFFER_MAX`). */
export const PEEK_MAX = 4 * 1024 * 1024;
/** What very old libvirt daemons allow per peek. */
export const PEEK_FALLBACK = 64 * 1024;
/** Peeks in flight per connection. */
export const PEEK_LIMIT = 4;

interface Read {
  dom: LibvirtDomain;
  disk: string;
  offset: number;
  buf: Uint8Array;
  resolve(lent?: LentBytes): void;
  reject(err: unknown): void;
  taken: boolean;
}

/** The peeks of one libvirt connection. */
export class PeekScheduler {
  /** The largest single peek; lowered to {@linkcode PEEK_FALLBACK} if refused. */
  peekMax: number;
  #limit: number;
  #running = 0;
  #queue: Read[] = [];
  /** Waiting reads by domain handle and start offset, to find the read that continues another. */
  #starts = new Map<LibvirtDomain, Map<number, Read>>();
  #spare: Uint8Array[] = [];

  /**
   * Create a scheduler.
   *
   * @param peekMax The peek size to aim at, at most {@linkcode PEEK_MAX}.
   * @param limit How many peeks may be in flight.
   */
  constructor(peekMax: number = PEEK_SIZE, limit: number = PEEK_LIMIT) {
    this.peekMax = Math.min(peekMax, PEEK_MAX);
    this.#limit = limit;
  }

  /**
   * Fill `buf` with the bytes of `disk` at `offset`.
   *
   * @param dom The domain.
   * @param disk The disk's target or source path.
   * @param buf Where the bytes go; untouched by the caller until this settles.
   * @param offset Where to read.
   * @returns Nothing once `buf` is full, or the bytes lent instead when the
   *   read was merged with others (release them once used); rejects with
   *   libvirt's error.
   */
  read(
    dom: LibvirtDomain,
    disk: string,
    buf: Uint8Array,
    offset: number,
  ): Promise<LentBytes | undefined> {
    const max = this.peekMax;
    if (buf.length === 0) return Promise.resolve(undefined); // libvirt fails zero-byte peeks
    if (buf.length <= max) return this.#enqueue(dom, disk, buf, offset);
    const pieces = [];
    for (let at = 0; at < buf.length; at += max) {
      const piece = buf.subarray(at, at + max);
      pieces.push(
        this.#enqueue(dom, disk, piece, offset + at).then((lent) => {
          if (!lent) return;
          piece.set(lent.bytes); // a large read is one reply: its pieces are gathered
          lent.release?.();
        }),
      );
    }
    return Promise.all(pieces).then(() => undefined);
  }

  #enqueue(
    dom: LibvirtDomain,
    disk: string,
    buf: Uint8Array,
    offset: number,
  ): Promise<LentBytes | undefined> {
    return new Promise((resolve, reject) => {
      const read: Read = { dom, disk, offset, buf, resolve, reject, taken: false };
      if (this.#running < this.#limit) return this.#start([read]);
      this.#queue.push(read);
      let starts = this.#starts.get(dom);
      if (!starts) this.#starts.set(dom, starts = new Map());
      starts.set(offset, read);
    });
  }

  /** Start waiting reads while there is room, each merged with the reads that continue it. */
  #pump(): void {
    while (this.#running < this.#limit && this.#queue.length > 0) {
      const first = this.#queue.shift()!;
      if (first.taken) continue;
      const run = [this.#take(first)];
      let end = first.offset + first.buf.length;
      let length = first.buf.length;
      const starts = this.#starts.get(first.dom);
      for (let next = starts?.get(end); next; next = starts?.get(end)) {
        if (next.disk !== first.disk || length + next.buf.length > this.peekMax) break;
        run.push(this.#take(next));
        end += next.buf.length;
        length += next.buf.length;
      }
      this.#start(run);
    }
  }

  #take(read: Read): Read {
    read.taken = true;
    const starts = this.#starts.get(read.dom)!;
    starts.delete(read.offset);
    if (starts.size === 0) this.#starts.delete(read.dom);
    return read;
  }

  async #start(run: Read[]): Promise<void> {
    this.#running++;
    const { dom, disk, offset } = run[0];
    const length = run.reduce((n, r) => n + r.buf.length, 0);
    // One read peeks into its own buffer; a merged run into a spare one.
    const spare = run.length === 1 ? undefined : this.#spare.pop() ??
      new Uint8Array(this.peekMax);
    const buf = spare ? spare.subarray(0, length) : run[0].buf;
    try {
      await this.#peek(dom, disk, buf, offset);
      if (spare) this.#lend(spare, run);
      else run[0].resolve();
    } catch (err) {
      if (spare) this.#recycle(spare);
      for (const r of run) r.reject(err);
    } finally {
      this.#running--;
      this.#pump();
    }
  }

  /** Lend each read of a merged run its part of `spare`, which is reused once all are released. */
  #lend(spare: Uint8Array, run: Read[]): void {
    let unreleased = run.length;
    let at = 0;
    for (const r of run) {
      let released = false;
      const release = () => {
        if (released) return;
        released = true;
        if (--unreleased === 0) this.#recycle(spare);
      };
      r.resolve({ bytes: spare.subarray(at, at + r.buf.length), release });
      at += r.buf.length;
    }
  }

  #recycle(spare: Uint8Array): void {
    // Replies waiting to be written hold spares too: keep a few more than run at once.
    if (spare.length === this.peekMax && this.#spare.length < 2 * this.#limit) {
      this.#spare.push(spare);
    }
  }

  async #peek(dom: LibvirtDomain, disk: string, buf: Uint8Array, offset: number): Promise<void> {
    // A read cut before peekMax was lowered is peeked in pieces of the new size.
    if (buf.length > this.peekMax) return await this.#pieces(dom, disk, buf, offset, this.peekMax);
    try {
      await dom.blockPeek(disk, offset, buf);
    } catch (err) {
      if (this.peekMax <= PEEK_FALLBACK || buf.length <= PEEK_FALLBACK) throw err;
      // Maybe the connection refuses peeks this large: try 64 KiB ones, once.
      try {
        await this.#pieces(dom, disk, buf, offset, PEEK_FALLBACK);
      } catch {
        throw err;
      }
      this.peekMax = PEEK_FALLBACK;
    }
  }

  async #pieces(dom: LibvirtDomain, disk: string, buf: Uint8Array, offset: number, size: number) {
    for (let at = 0; at < buf.length; at += size) {
      await dom.blockPeek(disk, offset + at, buf.subarray(at, at + size));
    }
  }
}
