/**
 * What the three libvirt bindings share: the library's name, the load
 * error, and the layout of libvirt's `virError`.
 *
 * @module
 */

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
