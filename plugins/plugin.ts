/**
 * The plugin contract: what a plugin provides and what the server calls.
 *
 * A plugin is one object: a few lifecycle steps (config, configComplete,
 * getReady, open, close, unload), optional capability answers, and a handful
 * of I/O callbacks. Everything but `name`, `open`, `getSize` and `pread` is
 * optional, and the server derives the capabilities from which callbacks
 * exist, as nbdkit does: a plugin without `pwrite` is read-only, one without
 * `flush` does not advertise FLUSH, one without `zero` gets WRITE_ZEROES
 * emulated with `pwrite`.
 *
 * Offsets are JavaScript numbers: the server proves that
 * `offset + count <= Number.MAX_SAFE_INTEGER` (and within the export's size)
 * before it calls a plugin, and answers EOVERFLOW otherwise. Sizes may be
 * `bigint` so that an export can be larger than 2^53 bytes.
 *
 * Errors: throw an {@linkcode NbdError} to choose the errno the client sees;
 * anything else thrown becomes EIO. The server logs the message once.
 *
 * @module
 */

/**
 * How the server may overlap calls into a plugin, with nbdkit's names.
 *
 * - `serialize_connections`: one connection at a time.
 * - `serialize_all_requests`: one request at a time across all connections.
 * - `serialize_requests`: one request at a time per connection.
 * - `parallel`: requests overlap freely (the default).
 */
export type ThreadModel =
  | "serialize_connections"
  | "serialize_all_requests"
  | "serialize_requests"
  | "parallel";

/** How FUA (force unit access) or CACHE is provided: not at all, emulated by the server, or by the plugin. */
export type SupportMode = "none" | "emulate" | "native";

/** One export offered by {@linkcode Plugin.listExports}. */
export interface ExportInfo {
  /** The export name the client asks for. */
  name: string;
  /** A human readable description, shown by `nbdinfo --list`. */
  description?: string;
}

/** Block size constraints of an export (all in bytes, powers of two). */
export interface BlockSize {
  /** The smallest request size the export supports. */
  minimum: number;
  /** The size that performs best. */
  preferred: number;
  /** The largest request size the export supports. */
  maximum: number;
}

/** What the server tells a plugin when a client connects. */
export interface OpenContext {
  /** True when the connection must not write (`-r`, or the plugin cannot). */
  readonly: boolean;
  /** The export name the client asked for ("" is the default export). */
  exportName: string;
  /** True when the connection is protected by TLS. */
  tls: boolean;
  /** A number identifying the connection, for messages. */
  connection: number;
}

/** What the server tells {@linkcode Plugin.listExports}. */
export interface ListContext {
  /** True when the server runs read-only. */
  readonly: boolean;
  /** True when the connection is protected by TLS. */
  tls: boolean;
}

/** Flags of a write. */
export interface WriteFlags {
  /** Force unit access: the data must be on stable storage before returning. */
  fua: boolean;
}

/** Flags of a zero request. */
export interface ZeroFlags {
  /** Force unit access. */
  fua: boolean;
  /** The plugin may punch a hole instead of writing zeroes. */
  mayTrim: boolean;
  /** Fail at once with ENOTSUP unless zeroing is faster than writing. */
  fastZero: boolean;
}

/** Flags of an extents query. */
export interface ExtentsFlags {
  /** The client wants one extent only (the first). */
  reqOne: boolean;
}

/** Extent type flag: the range is not allocated. */
export const EXTENT_HOLE = 1;
/** Extent type flag: the range reads as zeroes. */
export const EXTENT_ZERO = 2;

/**
 * Where a plugin reports extents, from `offset` upwards, in order, without
 * gaps. `type` is a combination of {@linkcode EXTENT_HOLE} and
 * {@linkcode EXTENT_ZERO} (0 for allocated data).
 */
export interface ExtentSink {
  /** Report that `length` bytes at `offset` have the given type. */
  add(offset: number, length: number, type: number): void;
}

/** A value or a promise of it: every callback may be synchronous or async. */
export type Awaitable<T> = T | Promise<T>;

/**
 * A plugin. `H` is the per-connection handle returned by `open`.
 *
 * @example A 1 MiB read-only disk of 0xAA bytes
 * ```ts
 * import type { Plugin } from "./plugin.ts";
 * const pattern: Plugin<null> = {
 *   name: "pattern",
 *   open: () => null,
 *   getSize: () => 1024 * 1024,
 *   pread: (_h, buf) => void buf.fill(0xaa),
 * };
 * console.assert(pattern.name === "pattern");
 * ```
 */
export interface Plugin<H = unknown> {
  /** The plugin's name, as typed on the command line. */
  name: string;
  /** The plugin's version. */
  version?: string;
  /** A one-line description. */
  longname?: string;
  /** The parameters, shown by `nbdkit-ts PLUGIN --help`. */
  configHelp?: string;
  /** The key a bare `VALUE` on the command line stands for (`file` for the file plugin). */
  magicConfigKey?: string;
  /** How calls may overlap; `parallel` when absent. */
  threadModel?: ThreadModel;

  /** One `key=value` from the command line, in order. Throw for an unknown key. */
  config?(key: string, value: string): Awaitable<void>;
  /** All parameters are in: check the required ones. */
  configComplete?(): Awaitable<void>;
  /** Acquire global resources, once, before the first client. */
  getReady?(): Awaitable<void>;
  /** Release global resources when the server stops (drain, close files). */
  unload?(): Awaitable<void>;

  /** The exports `NBD_OPT_LIST` reports; a single default export when absent. */
  listExports?(ctx: ListContext): Awaitable<ExportInfo[]>;
  /** The canonical name of the default export "". */
  defaultExport?(ctx: ListContext): Awaitable<string>;

  /** A client chose an export: return the connection's handle. */
  open(ctx: OpenContext): Awaitable<H>;
  /** The connection ends. */
  close?(h: H): Awaitable<void>;

  /** The export's size in bytes. */
  getSize(h: H): Awaitable<number | bigint>;
  /** A description of the export (`NBD_INFO_DESCRIPTION`). */
  exportDescription?(h: H): Awaitable<string | undefined>;
  /** Block size constraints; the server's defaults when absent. */
  blockSize?(h: H): Awaitable<BlockSize | undefined>;

  /** Whether writes are possible; defaults to whether `pwrite` exists. */
  canWrite?(h: H): Awaitable<boolean>;
  /** Whether FLUSH is possible; defaults to whether `flush` exists. */
  canFlush?(h: H): Awaitable<boolean>;
  /** Whether the export is rotational; false by default. */
  isRotational?(h: H): Awaitable<boolean>;
  /** Whether TRIM is possible; defaults to whether `trim` exists. */
  canTrim?(h: H): Awaitable<boolean>;
  /** Whether WRITE_ZEROES is possible; defaults to true (emulated with `pwrite` without `zero`). */
  canZero?(h: H): Awaitable<boolean>;
  /** Whether zeroing is fast; defaults to true without `zero` (the emulation fails fast), false with it. */
  canFastZero?(h: H): Awaitable<boolean>;
  /** FUA support; `emulate` (by flushing) when `flush` exists, `none` otherwise. */
  canFua?(h: H): Awaitable<SupportMode>;
  /** Whether several connections see a consistent export; false by default. */
  canMultiConn?(h: H): Awaitable<boolean>;
  /** CACHE support; `native` when `cache` exists, `none` otherwise. */
  canCache?(h: H): Awaitable<SupportMode>;
  /** Whether `extents` answers; defaults to whether `extents` exists. */
  canExtents?(h: H): Awaitable<boolean>;

  /** Fill `buf` with the bytes at `offset`. */
  pread(h: H, buf: Uint8Array, offset: number): Awaitable<void>;
  /** Write `buf` at `offset`. The server owns `buf` again once this settles. */
  pwrite?(h: H, buf: Uint8Array, offset: number, flags: WriteFlags): Awaitable<void>;
  /** Make every completed write durable. */
  flush?(h: H): Awaitable<void>;
  /** Discard `count` bytes at `offset`. */
  trim?(h: H, count: number, offset: number, flags: WriteFlags): Awaitable<void>;
  /** Make `count` bytes at `offset` read as zeroes. */
  zero?(h: H, count: number, offset: number, flags: ZeroFlags): Awaitable<void>;
  /** Report the allocation of `count` bytes at `offset` (at least the first extent). */
  extents?(
    h: H,
    count: number,
    offset: number,
    flags: ExtentsFlags,
    sink: ExtentSink,
  ): Awaitable<void>;
  /** Prefetch `count` bytes at `offset`. */
  cache?(h: H, count: number, offset: number): Awaitable<void>;
}

/**
 * Define a plugin with its handle type inferred from `open`.
 *
 * @param plugin The plugin.
 * @returns The same object, typed.
 *
 * @example
 * ```ts
 * import { definePlugin } from "./plugin.ts";
 * const zeroes = definePlugin({
 *   name: "zeroes",
 *   open: () => ({ size: 4096 }),
 *   getSize: (h) => h.size,
 *   pread: (_h, buf) => void buf.fill(0),
 * });
 * console.assert(zeroes.name === "zeroes");
 * ```
 */
export function definePlugin<H>(plugin: Plugin<H>): Plugin<H> {
  return plugin;
}
