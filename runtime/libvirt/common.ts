/**
 * What the three libvirt bindings share: the library's name, the load
 * error, the layout of libvirt's `virError`, and a domain handle's lifetime.
 *
 * @module
 */
import { LibvirtError } from "../../plugins/libvirt/bindings.ts";

/** The shared library every binding loads. */
export const LIBVIRT_SONAME = "libvirt.so.0";

/**
 * Bytes for one `virError` (80 on 64-bit: code, domain, message, level,
 * conn, dom, str1-3, int1, int2, net), rounded up for safety.
 */
export const VIR_ERROR_SIZE = 128;

/** Offset of `virError.message` (after two ints) on 64-bit platforms. */
export const VIR_ERROR_MESSAGE_OFFSET = 8;

/**
 * The one-line error for a missing or unloadable `libvirt.so.0`.
 *
 * @param cause What the runtime's loader said.
 * @returns The error to throw.
 */
export function libvirtLoadError(cause: unknown): Error {
  const detail = (cause instanceof Error ? cause.message : String(cause)).replace(/\s+/g, " ");
  return new Error(
    `Cannot load ${LIBVIRT_SONAME} (Debian's package 'libvirt0' provides it): ${detail}`,
    { cause },
  );
}

/**
 * The lifetime of a domain handle with peeks in flight on other threads:
 * `free()` may come while a peek still uses the handle, so the handle is
 * released when the last peek ends, and no new peek starts once freed.
 */
export class DomainLifetime {
  #inFlight = 0;
  #freed = false;
  #release: () => void;

  /** @param release Frees the handle (virDomainFree); called exactly once. */
  constructor(release: () => void) {
    this.#release = release;
  }

  /** Throw if the handle has been freed. */
  check(): void {
    if (this.#freed) throw new LibvirtError("invalid domain pointer", 0);
  }

  /** Run a peek that uses the handle; the handle outlives it. */
  async use<T>(peek: () => Promise<T>): Promise<T> {
    this.check();
    this.#inFlight++;
    try {
      return await peek();
    } finally {
      if (--this.#inFlight === 0 && this.#freed) this.#release();
    }
  }

  /** Free the handle now, or when the last peek in flight ends. */
  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    if (this.#inFlight === 0) this.#release();
  }
}
