/**
 * Encoders for the fixed-layout messages of the protocol.
 *
 * @module
 */
import {
  NBD_REP_MAGIC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "./constants.ts";

const encoder = new TextEncoder();

/** A framing error: the peer broke the protocol and the connection must end. */
export class ProtocolError extends Error {
  /** Create the error with a one-line message. */
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** UTF-8 bytes of a string. */
export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

/** Write a u64 (as two u32 halves, to stay in numbers) into a view. */
export function setU64(view: DataView, at: number, value: bigint | number): void {
  const big = BigInt(value);
  view.setUint32(at, Number(big >> 32n));
  view.setUint32(at + 4, Number(big & 0xffffffffn));
}

/**
 * An option reply: magic, option, reply type, length, data.
 *
 * @param option The option being answered.
 * @param type `NBD_REP_*`.
 * @param data The reply's payload.
 * @returns The encoded reply.
 */
export function optionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)) {
  const out = new Uint8Array(20 + data.length);
  const view = new DataView(out.buffer);
  setU64(view, 0, NBD_REP_MAGIC);
  view.setUint32(8, option);
  view.setUint32(12, type);
  view.setUint32(16, data.length);
  out.set(data, 20);
  return out;
}

/**
 * Concatenate byte arrays.
 *
 * @param parts The pieces.
 * @returns One array holding them in order.
 */
export function concat(...parts: Uint8Array[]): Uint8Array {
  let length = 0;
  for (const p of parts) length += p.length;
  const out = new Uint8Array(length);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Bytes of a u16 in network order. */
export function u16(value: number): Uint8Array {
  return new Uint8Array([(value >> 8) & 0xff, value & 0xff]);
}

/** Bytes of a u32 in network order. */
export function u32(value: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value);
  return out;
}

/** Bytes of a u64 in network order. */
export function u64(value: bigint | number): Uint8Array {
  const out = new Uint8Array(8);
  setU64(new DataView(out.buffer), 0, value);
  return out;
}

/**
 * A request's 64-bit cookie, as the two 32-bit halves it is echoed from.
 * Numbers, not bytes: an 8-byte array per request cost V8 an off-heap
 * allocation and its free (a fifth of the server's malloc calls under 4 KiB
 * random writes).
 */
export interface Cookie {
  /** The high 32 bits. */
  cookieHi: number;
  /** The low 32 bits. */
  cookieLo: number;
}

/** Size of a simple reply header. */
export const SIMPLE_HEADER = 16;
/** Size of a structured reply chunk header. */
export const CHUNK_HEADER = 20;

/**
 * Fill a simple reply header at the start of `out`.
 *
 * @param out At least 16 bytes.
 * @param cookie The request's cookie.
 * @param error The errno (0 for success).
 */
export function putSimpleHeader(out: Uint8Array, cookie: Cookie, error: number): void {
  const view = new DataView(out.buffer, out.byteOffset, SIMPLE_HEADER);
  view.setUint32(0, NBD_SIMPLE_REPLY_MAGIC);
  view.setUint32(4, error);
  view.setUint32(8, cookie.cookieHi);
  view.setUint32(12, cookie.cookieLo);
}

/**
 * Fill a structured chunk header at the start of `out`.
 *
 * @param out At least 20 bytes.
 * @param cookie The request's cookie.
 * @param flags `NBD_REPLY_FLAG_*`.
 * @param type `NBD_REPLY_TYPE_*`.
 * @param length The payload length after the header.
 */
export function putChunkHeader(
  out: Uint8Array,
  cookie: Cookie,
  flags: number,
  type: number,
  length: number,
): void {
  const view = new DataView(out.buffer, out.byteOffset, CHUNK_HEADER);
  view.setUint32(0, NBD_STRUCTURED_REPLY_MAGIC);
  view.setUint16(4, flags);
  view.setUint16(6, type);
  view.setUint32(8, cookie.cookieHi);
  view.setUint32(12, cookie.cookieLo);
  view.setUint32(16, length);
}

/**
 * A final structured error chunk with an empty message.
 *
 * @param cookie The request's cookie.
 * @param error The errno.
 * @returns The encoded chunk.
 */
export function structuredError(cookie: Cookie, error: number): Uint8Array {
  const out = new Uint8Array(CHUNK_HEADER + 6);
  putChunkHeader(out, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6);
  new DataView(out.buffer).setUint32(CHUNK_HEADER, error);
  return out;
}
