/**
 * Text for FFI calls, shared by the bindings of every runtime.
 *
 * @module
 */

const encoder = new TextEncoder();

/**
 * `text` as NUL-terminated UTF-8, for a `const char *` argument.
 *
 * @param text The string.
 * @returns Its bytes and a final 0.
 */
export function cString(text: string): Uint8Array<ArrayBuffer> {
  return encoder.encode(`${text}\0`);
}
