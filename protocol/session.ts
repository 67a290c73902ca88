/**
 * What the protocol needs from the server behind it: a way to list and open
 * exports, and, for an open export, its description and I/O. The server
 * (`server/`) implements these on top of a plugin; tests implement them
 * directly.
 *
 * Errors thrown from any of these methods carry an errno (see
 * `plugins/errors.ts`); the protocol turns them into the wire's error codes.
 *
 * @module
 */
import type { Awaitable, ExportInfo, LentBytes } from "../plugins/plugin.ts";

/** Block size constraints sent in `NBD_INFO_BLOCK_SIZE`. */
export interface BlockSizeInfo {
  /** Smallest supported request. */
  minimum: number;
  /** Best request size. */
  preferred: number;
  /** Largest supported request. */
  maximum: number;
}

/** Options of a zero request. */
export interface ZeroOptions {
  /** Force unit access. */
  fua: boolean;
  /** A hole may be punched. */
  mayTrim: boolean;
  /** Fail with ENOTSUP unless zeroing is fast. */
  fastZero: boolean;
}

/** An export opened for one connection. */
export interface ExportSession {
  /** The canonical export name. */
  readonly name: string;
  /** The size in bytes. */
  readonly size: bigint;
  /** Transmission flags (`NBD_FLAG_*`), computed once, without NBD_FLAG_SEND_DF. */
  readonly flags: number;
  /** A description, if any. */
  readonly description: string | undefined;
  /** Block size constraints, when the plugin states them. */
  readonly blockSize: BlockSizeInfo | undefined;
  /**
   * Whether {@linkcode ExportSession.read} writes every byte of its buffer:
   * only then may it get a reused buffer that was not zeroed first.
   */
  readonly readFillsBuffer?: boolean;
  /**
   * Fill `buf` from `offset`, or return bytes lent for the reply instead
   * (released once sent). Synchronous when the plugin is, so that the
   * request costs no promise: a throw is the read's failure.
   */
  read(buf: Uint8Array, offset: number): Awaitable<void | LentBytes>;
  /** Write `buf` at `offset`; synchronous when the plugin is (as `read`). */
  write(buf: Uint8Array, offset: number, fua: boolean): Awaitable<void>;
  /** Flush. */
  flush(): Promise<void>;
  /** Trim. */
  trim(count: number, offset: number, fua: boolean): Promise<void>;
  /** Write zeroes. */
  zero(count: number, offset: number, options: ZeroOptions): Promise<void>;
  /** Prefetch. */
  cache(count: number, offset: number): Promise<void>;
  /**
   * Allocation status from `offset`: pairs of (length, NBD_STATE_* flags),
   * contiguous, within `count`, at least one, merged.
   */
  extents(count: number, offset: number, reqOne: boolean): Promise<number[]>;
  /** The connection is over. */
  close(): Promise<void>;
}

/** The server behind the handshake. */
export interface ExportProvider {
  /** The exports `NBD_OPT_LIST` reports. */
  listExports(tls: boolean): Promise<ExportInfo[]>;
  /**
   * Open an export by name ("" for the default).
   *
   * @param name The name the client asked for.
   * @param tls Whether the connection is protected by TLS.
   */
  open(name: string, tls: boolean): Promise<ExportSession>;
}
