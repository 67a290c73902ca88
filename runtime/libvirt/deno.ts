/**
 * libvirt through `Deno.dlopen`.
 *
 * `virDomainBlockPeek` is declared `nonblocking`, so each peek runs on
 * Deno's blocking thread pool and many run at once (libvirt's connections
 * are thread safe). libvirt keeps the last error per thread, and a pool
 * thread is not ours to come back to, so a failed peek reads its message
 * from the copy libvirt keeps on the connection (`virConnCopyLastError`;
 * every failing public call stores it there before returning). Should two
 * peeks on one connection fail at the same instant for different reasons,
 * one could report the other's message; both are real failures of that
 * connection. Every other call is quick, runs on this thread, and reads
 * `virGetLastErrorMessage`.
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
  DomainLifetime,
  LIBVIRT_SONAME,
  libvirtLoadError,
  VIR_ERROR_MESSAGE_OFFSET,
  VIR_ERROR_SIZE,
} from "./common.ts";
import { cString } from "../c_string.ts";

const SYMBOLS = {
  virGetVersion: { parameters: ["buffer", "pointer", "pointer"], result: "i32" },
  virConnectOpen: { parameters: ["buffer"], result: "pointer" },
  virConnectOpenReadOnly: { parameters: ["buffer"], result: "pointer" },
  virConnectClose: { parameters: ["pointer"], result: "i32" },
  virConnectIsAlive: { parameters: ["pointer"], result: "i32" },
  virDomainLookupByName: { parameters: ["pointer", "buffer"], result: "pointer" },
  virDomainGetXMLDesc: { parameters: ["pointer", "u32"], result: "pointer" },
  virDomainGetBlockInfo: { parameters: ["pointer", "buffer", "buffer", "u32"], result: "i32" },
  virDomainBlockPeek: {
    parameters: ["pointer", "buffer", "u64", "usize", "buffer", "u32"],
    result: "i32",
    nonblocking: true,
  },
  virDomainFree: { parameters: ["pointer"], result: "i32" },
  virGetLastErrorMessage: { parameters: [], result: "pointer" },
  virGetLastErrorCode: { parameters: [], result: "i32" },
  virConnCopyLastError: { parameters: ["pointer", "buffer"], result: "i32" },
  virResetError: { parameters: ["buffer"], result: "void" },
  virSetErrorFunc: { parameters: ["pointer", "pointer"], result: "void" },
} as const;

const LIBC = {
  free: { parameters: ["pointer"], result: "void" },
  dlsym: { parameters: ["pointer", "buffer"], result: "pointer" },
} as const;

type Lib = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];
type Libc = Deno.DynamicLibrary<typeof LIBC>["symbols"];

function lastError(lib: Lib): LibvirtError {
  const msg = lib.virGetLastErrorMessage();
  const text = msg ? Deno.UnsafePointerView.getCString(msg) : "unknown error";
  return new LibvirtError(text, lib.virGetLastErrorCode());
}

function connectionError(lib: Lib, conn: Deno.PointerValue): LibvirtError {
  const err = new Uint8Array(VIR_ERROR_SIZE);
  const code = lib.virConnCopyLastError(conn, err);
  const view = new DataView(err.buffer);
  const msg = Deno.UnsafePointer.create(view.getBigUint64(VIR_ERROR_MESSAGE_OFFSET, true));
  const text = msg ? Deno.UnsafePointerView.getCString(msg) : "unknown error";
  lib.virResetError(err);
  return new LibvirtError(text, Math.max(code, 0));
}

class DenoDomain implements LibvirtDomain {
  #lib: Lib;
  #libc: Libc;
  #conn: Deno.PointerValue;
  #dom: Deno.PointerValue;
  #names = new Map<string, Uint8Array<ArrayBuffer>>();
  #life: DomainLifetime;

  constructor(lib: Lib, libc: Libc, conn: Deno.PointerValue, dom: Deno.PointerValue) {
    this.#lib = lib;
    this.#libc = libc;
    this.#conn = conn;
    this.#dom = dom;
    this.#life = new DomainLifetime(() => this.#release());
  }

  // The disk's name as a C string, encoded once rather than per request.
  #name(disk: string): Uint8Array<ArrayBuffer> {
    let name = this.#names.get(disk);
    if (!name) this.#names.set(disk, name = cString(disk));
    return name;
  }

  xmlDesc(): string {
    const xml = this.#lib.virDomainGetXMLDesc(this.#dom, 0);
    if (!xml) throw lastError(this.#lib);
    try {
      return Deno.UnsafePointerView.getCString(xml);
    } finally {
      this.#libc.free(xml);
    }
  }

  blockInfo(disk: string): BlockInfo {
    const info = new BigUint64Array(3);
    if (this.#lib.virDomainGetBlockInfo(this.#dom, this.#name(disk), info, 0) < 0) {
      throw lastError(this.#lib);
    }
    return { capacity: info[0], allocation: info[1], physical: info[2] };
  }

  async blockPeek(disk: string, offset: number, buf: Uint8Array): Promise<void> {
    await this.#life.use(async () => {
      const r = await this.#lib.virDomainBlockPeek(
        this.#dom,
        this.#name(disk),
        BigInt(offset),
        BigInt(buf.length),
        buf as Uint8Array<ArrayBuffer>,
        0,
      );
      if (r < 0) throw connectionError(this.#lib, this.#conn);
    });
  }

  free(): void {
    this.#life.free();
  }

  #release(): void {
    this.#lib.virDomainFree(this.#dom);
    this.#dom = null;
  }
}

class DenoConnection implements LibvirtConnection {
  #lib: Lib;
  #libc: Libc;
  #conn: Deno.PointerValue;

  constructor(lib: Lib, libc: Libc, conn: Deno.PointerValue) {
    this.#lib = lib;
    this.#libc = libc;
    this.#conn = conn;
  }

  isAlive(): boolean {
    return this.#conn !== null && this.#lib.virConnectIsAlive(this.#conn) === 1;
  }

  lookupDomain(name: string): LibvirtDomain {
    const dom = this.#lib.virDomainLookupByName(this.#conn, cString(name));
    if (!dom) throw lastError(this.#lib);
    return new DenoDomain(this.#lib, this.#libc, this.#conn, dom);
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
export function loadLibvirt(): LibvirtBindings {
  let lib: Lib;
  let libc: Libc;
  try {
    lib = Deno.dlopen(LIBVIRT_SONAME, SYMBOLS).symbols;
    libc = Deno.dlopen("libc.so.6", LIBC).symbols;
  } catch (err) {
    if (err instanceof Deno.errors.NotCapable || err instanceof Deno.errors.PermissionDenied) {
      throw err;
    }
    throw libvirtLoadError(err);
  }
  // libvirt prints every error on stderr unless a handler is set, and the
  // plugin reports the message itself. A JavaScript handler would have to
  // hop threads for errors raised on the peek threads, so the handler is
  // libc's free(): called as handler(NULL, err) it frees NULL, a no-op.
  // (dlsym with a NULL handle is RTLD_DEFAULT on glibc.)
  lib.virSetErrorFunc(null, libc.dlsym(null, cString("free")));

  const ver = new BigUint64Array(1);
  if (lib.virGetVersion(ver, null, null) < 0) throw lastError(lib);
  return {
    version: versionString(Number(ver[0])),
    connect(uri, readonly = false) {
      const name = uri === undefined ? null : cString(uri);
      const conn = readonly ? lib.virConnectOpenReadOnly(name) : lib.virConnectOpen(name);
      if (!conn) throw lastError(lib);
      return new DenoConnection(lib, libc, conn);
    },
  };
}
