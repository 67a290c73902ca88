/**
 * The small slice of libvirt the libvirt plugin uses, as a typed interface.
 *
 * `runtime/libvirt/` implements it once per runtime (Deno.dlopen, bun:ffi,
 * koffi) and `runtime/libvirt/mod.ts` loads the right one with `import()`,
 * so that importing the plugin needs no FFI permission. Handles are objects;
 * every libvirt failure becomes a {@linkcode LibvirtError} whose message is
 * libvirt's own text (what `virGetLastErrorMessage` returns).
 *
 * @module
 */

/**
 * A failed libvirt call.
 *
 * @example
 * ```ts
 * import { LibvirtError, VIR_ERR_INVALID_ARG } from "./bindings.ts";
 * const err = new LibvirtError("invalid argument: invalid path x not assigned to domain", 8);
 * console.assert(err.code === VIR_ERR_INVALID_ARG);
 * ```
 */
export class LibvirtError extends Error {
  /** libvirt's error number (`virErrorNumber`), 0 when unknown. */
  readonly code: number;

  /**
   * Create an error.
   *
   * @param message libvirt's message.
   * @param code libvirt's error number.
   */
  constructor(message: string, code: number) {
    super(message);
    this.name = "LibvirtError";
    this.code = code;
  }
}

/** `VIR_ERR_INVALID_ARG`: e.g. a disk that is not assigned to the domain. */
export const VIR_ERR_INVALID_ARG = 8;
/** `VIR_ERR_RPC`: e.g. a peek larger than the remote protocol allows. */
export const VIR_ERR_RPC = 39;
/** `VIR_ERR_NO_DOMAIN`: no domain with that name. */
export const VIR_ERR_NO_DOMAIN = 42;

/** What `virDomainGetBlockInfo` reports about one disk, in bytes. */
export interface BlockInfo {
  /** The size the guest sees. */
  capacity: bigint;
  /** Host storage in use. */
  allocation: bigint;
  /** The size of the container on the host (the file's size). */
  physical: bigint;
}

/** A domain handle (`virDomainPtr`). */
export interface LibvirtDomain {
  /** The domain's XML description (`virDomainGetXMLDesc`, inactive flags 0). */
  xmlDesc(): string;
  /** Sizes of one disk, named by target (`sda`) or source path. */
  blockInfo(disk: string): BlockInfo;
  /**
   * Read `buf.length` bytes of `disk` at `offset` (`virDomainBlockPeek`),
   * off the event loop where the runtime allows it. `buf` must stay
   * untouched until the promise settles.
   */
  blockPeek(disk: string, offset: number, buf: Uint8Array): Promise<void>;
  /** Release the handle, once any peek in flight has settled. */
  free(): void;
}

/** A connection (`virConnectPtr`). */
export interface LibvirtConnection {
  /** Whether the connection still works (`virConnectIsAlive`). */
  isAlive(): boolean;
  /** Find a domain by name (`virDomainLookupByName`). */
  lookupDomain(name: string): LibvirtDomain;
  /** Close the connection; libvirt keeps it until its domains are freed. */
  close(): void;
}

/** The library itself. */
export interface LibvirtBindings {
  /** The version of the loaded `libvirt.so.0`, e.g. "9.0.0" (`virGetVersion`). */
  readonly version: string;
  /**
   * Open a connection (`virConnectOpen`, or `virConnectOpenReadOnly` when
   * `readonly`). `uri` undefined lets libvirt choose its default URI.
   */
  connect(uri: string | undefined, readonly?: boolean): LibvirtConnection;
}

/**
 * The libvirt version number of `virGetVersion` as text.
 *
 * @param n major * 1,000,000 + minor * 1,000 + release.
 * @returns "major.minor.release".
 *
 * @example
 * ```ts
 * import { versionString } from "./bindings.ts";
 * console.assert(versionString(9000000) === "9.0.0");
 * ```
 */
export function versionString(n: number): string {
  return `${Math.floor(n / 1e6)}.${Math.floor(n / 1e3) % 1000}.${n % 1000}`;
}
