/**
 * libvirt through koffi on Node.
 *
 * koffi's `.async` runs `virDomainBlockPeek` on a libuv worker thread, so
 * many peeks run at once while the event loop serves. As on Deno, the last
 * error is per thread, so a failed asynchronous peek reads libvirt's
 * message from the copy kept on the connection (`virConnCopyLastError`),
 * with the same caveat as there: two peeks failing at the same instant for
 * different reasons could swap messages. The quick synchronous calls read
 * `virGetLastErrorMessage` on this thread.
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

type Ptr = bigint | null;
// deno-lint-ignore no-explicit-any
type Fn = (...args: any[]) => any;
type AsyncFn = Fn & { async: Fn };

interface Koffi {
  load(path: string): { func(definition: string): AsyncFn };
  decode: { string(ptr: bigint): string };
  config(options: Record<string, number>): void;
}

interface Lib {
  virGetVersion: Fn;
  virConnectOpen: Fn;
  virConnectOpenReadOnly: Fn;
  virConnectClose: Fn;
  virConnectIsAlive: Fn;
  virDomainLookupByName: Fn;
  virDomainGetXMLDesc: Fn;
  virDomainGetBlockInfo: Fn;
  virDomainBlockPeek: AsyncFn;
  virDomainFree: Fn;
  virGetLastErrorMessage: Fn;
  virGetLastErrorCode: Fn;
  virConnCopyLastError: Fn;
  virResetError: Fn;
  virSetErrorFunc: Fn;
}

const PROTOTYPES: Record<keyof Lib, string> = {
  virGetVersion: "int virGetVersion(void *libVer, const char *type, void *typeVer)",
  virConnectOpen: "void *virConnectOpen(const char *name)",
  virConnectOpenReadOnly: "void *virConnectOpenReadOnly(const char *name)",
  virConnectClose: "int virConnectClose(void *conn)",
  virConnectIsAlive: "int virConnectIsAlive(void *conn)",
  virDomainLookupByName: "void *virDomainLookupByName(void *conn, const char *name)",
  // The XML is malloc'ed by libvirt: `!` has koffi free() it once decoded.
  virDomainGetXMLDesc: "const char *! virDomainGetXMLDesc(void *dom, unsigned int flags)",
  virDomainGetBlockInfo:
    "int virDomainGetBlockInfo(void *dom, const char *disk, void *info, unsigned int flags)",
  virDomainBlockPeek: "int virDomainBlockPeek(void *dom, const char *disk, " +
    "unsigned long long offset, size_t size, void *buffer, unsigned int flags)",
  virDomainFree: "int virDomainFree(void *dom)",
  virGetLastErrorMessage: "const char *virGetLastErrorMessage(void)",
  virGetLastErrorCode: "int virGetLastErrorCode(void)",
  virConnCopyLastError: "int virConnCopyLastError(void *conn, void *to)",
  virResetError: "void virResetError(void *err)",
  virSetErrorFunc: "void virSetErrorFunc(void *userData, void *handler)",
};

function lastError(lib: Lib): LibvirtError {
  return new LibvirtError(
    lib.virGetLastErrorMessage() ?? "unknown error",
    lib.virGetLastErrorCode(),
  );
}

function connectionError(koffi: Koffi, lib: Lib, conn: Ptr): LibvirtError {
  const err = new Uint8Array(VIR_ERROR_SIZE);
  const code: number = lib.virConnCopyLastError(conn, err);
  const msg = new DataView(err.buffer).getBigUint64(VIR_ERROR_MESSAGE_OFFSET, true);
  const text = msg ? koffi.decode.string(msg) : "unknown error";
  lib.virResetError(err);
  return new LibvirtError(text, Math.max(code, 0));
}

class NodeDomain implements LibvirtDomain {
  #koffi: Koffi;
  #lib: Lib;
  #conn: Ptr;
  #dom: Ptr;
  #life: DomainLifetime;

  constructor(koffi: Koffi, lib: Lib, conn: Ptr, dom: Ptr) {
    this.#koffi = koffi;
    this.#lib = lib;
    this.#conn = conn;
    this.#dom = dom;
    this.#life = new DomainLifetime(() => lib.virDomainFree(dom));
  }

  xmlDesc(): string {
    const xml: string | null = this.#lib.virDomainGetXMLDesc(this.#dom, 0);
    if (xml === null) throw lastError(this.#lib);
    return xml;
  }

  blockInfo(disk: string): BlockInfo {
    const info = new BigUint64Array(3);
    if (this.#lib.virDomainGetBlockInfo(this.#dom, disk, info, 0) < 0) throw lastError(this.#lib);
    return { capacity: info[0], allocation: info[1], physical: info[2] };
  }

  async blockPeek(disk: string, offset: number, buf: Uint8Array): Promise<void> {
    await this.#life.use(async () => {
      const r = await new Promise<number>((resolve, reject) => {
        this.#lib.virDomainBlockPeek.async(
          this.#dom,
          disk,
          offset,
          buf.length,
          buf,
          0,
          (err: unknown, res: number) => err ? reject(err) : resolve(res),
        );
      });
      if (r < 0) throw connectionError(this.#koffi, this.#lib, this.#conn);
    });
  }

  free(): void {
    this.#life.free();
  }
}

class NodeConnection implements LibvirtConnection {
  #koffi: Koffi;
  #lib: Lib;
  #conn: Ptr;

  constructor(koffi: Koffi, lib: Lib, conn: Ptr) {
    this.#koffi = koffi;
    this.#lib = lib;
    this.#conn = conn;
  }

  isAlive(): boolean {
    return this.#conn !== null && this.#lib.virConnectIsAlive(this.#conn) === 1;
  }

  lookupDomain(name: string): LibvirtDomain {
    if (this.#conn === null) throw new LibvirtError("invalid connection pointer", 0);
    const dom: Ptr = this.#lib.virDomainLookupByName(this.#conn, name);
    if (!dom) throw lastError(this.#lib);
    return new NodeDomain(this.#koffi, this.#lib, this.#conn, dom);
  }

  close(): void {
    if (this.#conn === null) return;
    this.#lib.virConnectClose(this.#conn);
    this.#conn = null;
  }
}

/**
 * Load `libvirt.so.0` (and koffi, which is an optional dependency).
 *
 * @returns The bindings.
 * @throws {Error} When koffi or the library cannot be loaded.
 */
export async function loadLibvirt(): Promise<LibvirtBindings> {
  let koffi: Koffi;
  try {
    const mod = await import("koffi") as unknown as { default?: Koffi } & Koffi;
    koffi = mod.default ?? mod;
  } catch (err) {
    throw new Error(
      `The libvirt plugin needs the npm package 'koffi' on Node: ${(err as Error).message}`,
      { cause: err },
    );
  }
  let lib: Lib;
  let dlsym: Fn;
  try {
    const so = koffi.load(LIBVIRT_SONAME);
    lib = Object.fromEntries(
      Object.entries(PROTOTYPES).map(([name, proto]) => [name, so.func(proto)]),
    ) as unknown as Lib;
    dlsym = koffi.load("libc.so.6").func("void *dlsym(void *handle, const char *name)");
  } catch (err) {
    throw libvirtLoadError(err);
  }
  // libvirt prints every error on stderr unless a handler is set; the plugin
  // reports messages itself. libc's free(), called as handler(NULL, err),
  // frees NULL: a no-op that is safe on any thread (dlsym's NULL handle is
  // RTLD_DEFAULT on glibc).
  lib.virSetErrorFunc(null, dlsym(null, "free"));
  const ver = new BigUint64Array(1);
  if (lib.virGetVersion(ver, null, null) < 0) throw lastError(lib);
  return {
    version: versionString(Number(ver[0])),
    connect(uri, readonly = false) {
      const name = uri ?? null;
      const conn: Ptr = readonly ? lib.virConnectOpenReadOnly(name) : lib.virConnectOpen(name);
      if (!conn) throw lastError(lib);
      return new NodeConnection(koffi, lib, conn);
    },
  };
}
