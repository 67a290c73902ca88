/**
 * The little of `bun:ffi` the Bun binding uses, typed locally so that the
 * file type-checks under `deno check` too, and loaded with a computed
 * specifier so that no other runtime ever tries to resolve it.
 *
 * @module
 */

/** A native pointer as Bun represents it. */
export type BunPointer = number;

/** What `dlopen` gives back. */
export interface BunLibrary<S> {
  symbols: S;
  close(): void;
}

/** The parts of `bun:ffi` in use. */
export interface BunFfi {
  dlopen<S>(
    path: string,
    symbols: Record<string, { args: string[]; returns: string }>,
  ): BunLibrary<S>;
  ptr(view: ArrayBufferView): BunPointer;
  CString: new (ptr: BunPointer) => string;
}

/** The libvirt functions the Bun binding declares. */
export interface BunLibvirt {
  virGetVersion(ver: BigUint64Array, type: null, typeVer: null): number;
  virConnectOpen(name: Uint8Array | null): BunPointer | null;
  virConnectOpenReadOnly(name: Uint8Array | null): BunPointer | null;
  virConnectClose(conn: BunPointer): number;
  virConnectIsAlive(conn: BunPointer): number;
  virDomainLookupByName(conn: BunPointer, name: Uint8Array): BunPointer | null;
  virDomainGetXMLDesc(dom: BunPointer, flags: number): BunPointer | null;
  virDomainGetBlockInfo(
    dom: BunPointer,
    disk: Uint8Array,
    info: BigUint64Array,
    flags: number,
  ): number;
  virDomainBlockPeek(
    dom: BunPointer,
    disk: Uint8Array,
    offset: number,
    size: number,
    buf: BunPointer,
    flags: number,
  ): number;
  virDomainFree(dom: BunPointer): number;
  virGetLastErrorMessage(): BunPointer | null;
  virGetLastErrorCode(): number;
  virSetErrorFunc(userData: null, handler: BunPointer | null): void;
}

/** The libc functions the Bun binding declares. */
export interface BunLibc {
  free(ptr: BunPointer): void;
  dlsym(handle: null, name: Uint8Array): BunPointer | null;
}

/** The declarations of {@linkcode BunLibvirt}, for `dlopen`. */
export const LIBVIRT_SYMBOLS: Record<string, { args: string[]; returns: string }> = {
  virGetVersion: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  virConnectOpen: { args: ["ptr"], returns: "ptr" },
  virConnectOpenReadOnly: { args: ["ptr"], returns: "ptr" },
  virConnectClose: { args: ["ptr"], returns: "i32" },
  virConnectIsAlive: { args: ["ptr"], returns: "i32" },
  virDomainLookupByName: { args: ["ptr", "ptr"], returns: "ptr" },
  virDomainGetXMLDesc: { args: ["ptr", "u32"], returns: "ptr" },
  virDomainGetBlockInfo: { args: ["ptr", "ptr", "ptr", "u32"], returns: "i32" },
  virDomainBlockPeek: { args: ["ptr", "ptr", "u64", "usize", "ptr", "u32"], returns: "i32" },
  virDomainFree: { args: ["ptr"], returns: "i32" },
  virGetLastErrorMessage: { args: [], returns: "ptr" },
  virGetLastErrorCode: { args: [], returns: "i32" },
  virSetErrorFunc: { args: ["ptr", "ptr"], returns: "void" },
};

/** The declarations of {@linkcode BunLibc}, for `dlopen`. */
export const LIBC_SYMBOLS: Record<string, { args: string[]; returns: string }> = {
  free: { args: ["ptr"], returns: "void" },
  dlsym: { args: ["ptr", "ptr"], returns: "ptr" },
};

/** Import `bun:ffi` (only ever called on Bun). */
export async function importBunFfi(): Promise<BunFfi> {
  const specifier = ["bun", "ffi"].join(":");
  return await import(specifier) as BunFfi;
}

/** libvirt's last error on this thread, as text. */
export function lastErrorMessage(ffi: BunFfi, lib: BunLibvirt): string {
  const msg = lib.virGetLastErrorMessage();
  return msg ? new ffi.CString(msg) : "unknown error";
}
