/**
 * libvirt through `bun:ffi`.
 *
 * Bun's FFI calls are synchronous: a peek made on the main thread would
 * stop the server for the whole round trip to libvirtd. So peeks go to a
 * small pool of workers (`bun_worker.ts`), each making one synchronous call
 * at a time, into the caller's buffer, with the domain the main thread
 * looked up. Quick calls (connect, lookup, XML, block info) stay here.
 *
 * @module
 */
import {
  type BlockInfo,
  type LibvirtBindings,
  type LibvirtConnection,
  type LibvirtDomain,
  LibvirtError,
  versionString,
} from "../../plugins/libvirt/bindings.ts";
import {
  type BunFfi,
  type BunLibc,
  type BunLibvirt,
  type BunPointer,
  importBunFfi,
  lastErrorMessage,
  LIBC_SYMBOLS,
  LIBVIRT_SYMBOLS,
} from "./bun_ffi.ts";
import { type PeekInit, type PeekReply, type PeekRequest, peekWorker } from "./bun_worker.ts";
import { DomainLifetime, LIBVIRT_SONAME, libvirtLoadError } from "./common.ts";
import { cString } from "../c_string.ts";

/**
 * How many peeks run at once. libvirtd serves at most 5 calls of one client
 * at a time (`max_client_requests`), so more workers would only queue there.
 */
const WORKERS = 4;

let workerUrl: string | undefined;

interface BunWorker {
  postMessage(msg: PeekInit | PeekRequest): void;
  addEventListener(type: "message", fn: (e: MessageEvent<PeekReply>) => void): void;
  addEventListener(type: "error", fn: (e: ErrorEvent) => void): void;
  ref(): void;
  unref(): void;
}

interface Pending {
  resolve(): void;
  reject(err: Error): void;
  slot: Slot;
}

interface Slot {
  worker: BunWorker;
  ready: Promise<void>;
  busy: number;
}

/** The workers, started on the first peek and shared by all domains. */
class PeekPool {
  #slots: Slot[] = [];
  #pending = new Map<number, Pending>();
  #nextId = 1;

  #start(): Slot {
    // Started from source text, so that no worker file has to be found
    // in a compiled executable or an npm build.
    workerUrl ??= URL.createObjectURL(
      new Blob([`(${peekWorker})()`], { type: "application/javascript" }),
    );
    const ctor = (globalThis as unknown as { Worker: new (url: string) => BunWorker }).Worker;
    const worker = new ctor(workerUrl);
    worker.unref(); // idle workers must not keep the process alive
    let ready!: () => void;
    const slot: Slot = { worker, ready: new Promise((r) => ready = r), busy: 0 };
    worker.addEventListener("message", ({ data }) => {
      if (data.id === 0) return ready();
      const p = this.#pending.get(data.id);
      if (!p) return;
      this.#pending.delete(data.id);
      if (--p.slot.busy === 0) worker.unref();
      if (data.message === undefined) p.resolve();
      else p.reject(new LibvirtError(data.message, data.code ?? 0));
    });
    worker.addEventListener("error", (e) => {
      // A worker that dies fails its own requests, not the others'.
      this.#slots = this.#slots.filter((s) => s !== slot);
      for (const [id, p] of this.#pending) {
        if (p.slot !== slot) continue;
        this.#pending.delete(id);
        p.reject(new LibvirtError(`libvirt peek worker failed: ${e.message}`, 0));
      }
    });
    worker.postMessage({ soname: LIBVIRT_SONAME, symbols: LIBVIRT_SYMBOLS });
    this.#slots.push(slot);
    return slot;
  }

  peek(
    dom: BunPointer,
    disk: string,
    offset: number,
    buf: BunPointer,
    size: number,
  ): Promise<void> {
    // The least busy worker; a new one while there are fewer than WORKERS.
    let slot = this.#slots.find((s) => s.busy === 0);
    if (!slot && this.#slots.length < WORKERS) slot = this.#start();
    slot ??= this.#slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    // A worker with work keeps the process alive until it answers.
    if (slot.busy++ === 0) slot.worker.ref();
    const id = this.#nextId++;
    const done = new Promise<void>((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, slot });
    });
    // Sent once the worker has loaded libvirt; a worker that dies instead
    // rejects `done` from its error handler.
    slot.ready.then(() => slot.worker.postMessage({ id, dom, disk, offset, size, buf }));
    return done;
  }
}

class BunDomain implements LibvirtDomain {
  #ffi: BunFfi;
  #lib: BunLibvirt;
  #libc: BunLibc;
  #pool: PeekPool;
  #dom: BunPointer;
  #life: DomainLifetime;

  constructor(ffi: BunFfi, lib: BunLibvirt, libc: BunLibc, pool: PeekPool, dom: BunPointer) {
    this.#ffi = ffi;
    this.#lib = lib;
    this.#libc = libc;
    this.#pool = pool;
    this.#dom = dom;
    this.#life = new DomainLifetime(() => lib.virDomainFree(dom));
  }

  #error(): LibvirtError {
    return new LibvirtError(
      lastErrorMessage(this.#ffi, this.#lib),
      this.#lib.virGetLastErrorCode(),
    );
  }

  xmlDesc(): string {
    const xml = this.#lib.virDomainGetXMLDesc(this.#dom, 0);
    if (!xml) throw this.#error();
    try {
      return new this.#ffi.CString(xml);
    } finally {
      this.#libc.free(xml);
    }
  }

  blockInfo(disk: string): BlockInfo {
    const info = new BigUint64Array(3);
    if (this.#lib.virDomainGetBlockInfo(this.#dom, cString(disk), info, 0) < 0) throw this.#error();
    return { capacity: info[0], allocation: info[1], physical: info[2] };
  }

  async blockPeek(disk: string, offset: number, buf: Uint8Array): Promise<void> {
    this.#life.check();
    if (buf.length === 0) {
      // Nothing to transfer, and no address to take: ask here.
      const empty = new Uint8Array(1);
      const r = this.#lib.virDomainBlockPeek(
        this.#dom,
        cString(disk),
        offset,
        0,
        this.#ffi.ptr(empty),
        0,
      );
      if (r < 0) throw this.#error();
      return;
    }
    // The worker writes straight into `buf`, which the caller keeps alive.
    await this.#life.use(() =>
      this.#pool.peek(this.#dom, disk, offset, this.#ffi.ptr(buf), buf.length)
    );
  }

  free(): void {
    this.#life.free();
  }
}

class BunConnection implements LibvirtConnection {
  #ffi: BunFfi;
  #lib: BunLibvirt;
  #libc: BunLibc;
  #pool: PeekPool;
  #conn: BunPointer | null;

  constructor(ffi: BunFfi, lib: BunLibvirt, libc: BunLibc, pool: PeekPool, conn: BunPointer) {
    this.#ffi = ffi;
    this.#lib = lib;
    this.#libc = libc;
    this.#pool = pool;
    this.#conn = conn;
  }

  isAlive(): boolean {
    return this.#conn !== null && this.#lib.virConnectIsAlive(this.#conn) === 1;
  }

  lookupDomain(name: string): LibvirtDomain {
    if (this.#conn === null) throw new LibvirtError("invalid connection pointer", 0);
    const dom = this.#lib.virDomainLookupByName(this.#conn, cString(name));
    if (!dom) {
      throw new LibvirtError(
        lastErrorMessage(this.#ffi, this.#lib),
        this.#lib.virGetLastErrorCode(),
      );
    }
    return new BunDomain(this.#ffi, this.#lib, this.#libc, this.#pool, dom);
  }

  close(): void {
    if (this.#conn === null) return;
    this.#lib.virConnectClose(this.#conn);
    this.#conn = null;
  }
}

/**
 * Load `libvirt.so.0`.
 *
 * @returns The bindings.
 * @throws {Error} When the library cannot be loaded.
 */
export async function loadLibvirt(): Promise<LibvirtBindings> {
  const ffi = await importBunFfi();
  let lib: BunLibvirt;
  let libc: BunLibc;
  try {
    lib = ffi.dlopen<BunLibvirt>(LIBVIRT_SONAME, LIBVIRT_SYMBOLS).symbols;
    libc = ffi.dlopen<BunLibc>("libc.so.6", LIBC_SYMBOLS).symbols;
  } catch (err) {
    throw libvirtLoadError(err);
  }
  // libvirt prints every error on stderr unless a handler is set; the plugin
  // reports messages itself. libc's free(), called as handler(NULL, err),
  // frees NULL: a no-op that is safe on any thread (dlsym's NULL handle is
  // RTLD_DEFAULT on glibc).
  lib.virSetErrorFunc(null, libc.dlsym(null, cString("free")));
  const ver = new BigUint64Array(1);
  if (lib.virGetVersion(ver, null, null) < 0) {
    throw new LibvirtError(lastErrorMessage(ffi, lib), lib.virGetLastErrorCode());
  }
  const pool = new PeekPool();
  return {
    version: versionString(Number(ver[0])),
    connect(uri, readonly = false) {
      const name = uri === undefined ? null : cString(uri);
      const conn = readonly ? lib.virConnectOpenReadOnly(name) : lib.virConnectOpen(name);
      if (!conn) throw new LibvirtError(lastErrorMessage(ffi, lib), lib.virGetLastErrorCode());
      return new BunConnection(ffi, lib, libc, pool, conn);
    },
  };
}
