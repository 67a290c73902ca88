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
 * before it calls a plugin, and answers EINVAL otherwise. Sizes may be
 * `bigint` so that an export can be larger than 2^53 bytes.
 *
 * The lifecycle, as nbdkit's: `config` for each `key=value`, in order;
 * `configComplete` (check the required keys); `getReady` (global
 * resources); then per connection `open` … `close`; `unload` when the
 * server stops.
 *
 * Errors: throw an {@linkcode NbdError} to choose the errno the client sees;
 * anything else thrown becomes EIO. The server logs the message once.
 *
 * @example A read-only disk of a repeating byte, in a module of its own
 * ```ts
 * // fill.ts: nbdkit-ts ./fill.ts size=1G byte=0xaa
 * import { definePlugin, parseSize } from "../mod.ts";
 *
 * let size = -1n;
 * let byte = 0;
 *
 * export default definePlugin({
 *   name: "fill",
 *   configHelp: "size=<SIZE> (required), byte=<N> (default 0)",
 *   config(key, value) {
 *     if (key === "size") size = parseSize(value);
 *     else if (key === "byte") byte = Number(value);
 *     else throw new Error(`unknown parameter '${key}'`);
 *   },
 *   configComplete() {
 *     if (size < 0n) throw new Error("you must specify size=<SIZE> on the command line");
 *   },
 *   open: () => null,
 *   getSize: () => size,
 *   pread: (_h, buf) => void buf.fill(byte),
 * });
 * ```
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
 *
 * @example A plugin whose handle is not safe to use twice at once
 * ```ts
 * import { definePlugin } from "./plugin.ts";
 * const plugin = definePlugin({
 *   name: "one-at-a-time",
 *   threadModel: "serialize_requests",
 *   open: () => ({ busy: false }),
 *   getSize: () => 512,
 *   pread(h, buf) {
 *     console.assert(!h.busy); // never two calls at once on one connection
 *     buf.fill(0);
 *   },
 * });
 * console.assert(plugin.threadModel === "serialize_requests");
 * ```
 */
export type ThreadModel =
  | "serialize_connections"
  | "serialize_all_requests"
  | "serialize_requests"
  | "parallel";

/**
 * How FUA (force unit access) or CACHE is provided: not at all, emulated by
 * the server, or by the plugin.
 *
 * @example A plugin that honours FUA in `pwrite` itself
 * ```ts
 * import { definePlugin } from "./plugin.ts";
 * const disk = new Uint8Array(4096);
 * const plugin = definePlugin({
 *   name: "fua",
 *   open: () => null,
 *   getSize: () => disk.length,
 *   pread: (_h, buf, offset) => void buf.set(disk.subarray(offset, offset + buf.length)),
 *   pwrite: (_h, buf, offset, flags) => {
 *     disk.set(buf, offset);
 *     // With flags.fua, make this write durable before returning.
 *   },
 *   canFua: () => "native",
 * });
 * console.assert(plugin.canFua!(null) === "native");
 * ```
 */
export type SupportMode = "none" | "emulate" | "native";

/**
 * One export offered by {@linkcode Plugin.listExports}.
 *
 * @example Two exports, chosen by name in `open`
 * ```ts
 * import { definePlugin } from "./plugin.ts";
 * const disks: Record<string, Uint8Array> = { small: new Uint8Array(512), big: new Uint8Array(4096) };
 * const plugin = definePlugin({
 *   name: "two",
 *   listExports: () => [
 *     { name: "small", description: "512 bytes" },
 *     { name: "big", description: "4 KiB" },
 *   ],
 *   defaultExport: () => "small",
 *   open: ({ exportName }) => disks[exportName || "small"],
 *   getSize: (d) => d.length,
 *   pread: (d, buf, offset) => void buf.set(d.subarray(offset, offset + buf.length)),
 * });
 * const exports = await plugin.listExports!({ readonly: false, tls: false });
 * console.assert(exports?.length === 2);
 * ```
 */
export interface ExportInfo {
  /** The export name the client asks for. */
  name: string;
  /** A human readable description, shown by `nbdinfo --list`. */
  description?: string;
}

/**
 * Block size constraints of an export, in bytes, as the NBD spec allows them
 * (the open fails otherwise): `minimum` a power of two up to 64 KiB,
 * `preferred` a power of two from 512 bytes to 32 MiB, `maximum` a multiple
 * of `minimum` or -1 (no limit), and minimum ≤ preferred ≤ maximum. All three
 * 0: no constraints, as when `blockSize` is absent.
 *
 * @example A disk that works in 4 KiB sectors
 * ```ts
 * import type { BlockSize } from "./plugin.ts";
 * const sectors: BlockSize = { minimum: 4096, preferred: 65536, maximum: 32 * 1024 * 1024 };
 * console.assert(sectors.minimum <= sectors.preferred);
 * ```
 */
export interface BlockSize {
  /** The smallest request size the export supports. */
  minimum: number;
  /** The size that performs best. */
  preferred: number;
  /** The largest request size the export supports. */
  maximum: number;
}

/**
 * What the server tells a plugin when a client connects.
 *
 * @example Open a file read-only when the connection is
 * ```ts
 * import type { OpenContext } from "./plugin.ts";
 * function open(ctx: OpenContext) {
 *   return { mode: ctx.readonly ? "r" : "r+", name: ctx.exportName, id: ctx.connection };
 * }
 * console.assert(open({ readonly: true, exportName: "", tls: false, connection: 1 }).mode === "r");
 * ```
 */
export interface OpenContext {
  /** True when the server is read-only (`-r`): open files read-only then. */
  readonly: boolean;
  /** The export name the client asked for ("" is the default export). */
  exportName: string;
  /** True when the connection is protected by TLS. */
  tls: boolean;
  /** A number identifying the connection, for messages. */
  connection: number;
}

/**
 * What the server tells {@linkcode Plugin.listExports}.
 *
 * @example Hide writable exports from a read-only server
 * ```ts
 * import type { ExportInfo, ListContext } from "./plugin.ts";
 * const listExports = (ctx: ListContext): ExportInfo[] =>
 *   ctx.readonly ? [{ name: "snapshot" }] : [{ name: "snapshot" }, { name: "live" }];
 * console.assert(listExports({ readonly: true, tls: false }).length === 1);
 * ```
 */
export interface ListContext {
  /** True when the server runs read-only. */
  readonly: boolean;
  /** True when the connection is protected by TLS. */
  tls: boolean;
}

/**
 * Flags of a write (and of a trim).
 *
 * @example
 * ```ts
 * import type { WriteFlags } from "./plugin.ts";
 * const flags: WriteFlags = { fua: true }; // the client asked for NBD_CMD_FLAG_FUA
 * console.assert(flags.fua);
 * ```
 */
export interface WriteFlags {
  /** Force unit access: the data must be on stable storage before returning. */
  fua: boolean;
}

/**
 * Flags of a zero request.
 *
 * @example A `zero` that is fast only when it may punch a hole
 * ```ts
 * import { NbdError } from "./errors.ts";
 * import type { ZeroFlags } from "./plugin.ts";
 * function zero(count: number, offset: number, flags: ZeroFlags): void {
 *   if (flags.fastZero && !flags.mayTrim) throw new NbdError("ENOTSUP", "zeroing would be slow");
 *   // … punch a hole, or write zeroes, over count bytes at offset
 * }
 * zero(4096, 0, { fua: false, mayTrim: true, fastZero: true });
 * ```
 */
export interface ZeroFlags {
  /** Force unit access. */
  fua: boolean;
  /** The plugin may punch a hole instead of writing zeroes. */
  mayTrim: boolean;
  /** Fail at once with ENOTSUP unless zeroing is faster than writing. */
  fastZero: boolean;
}

/**
 * Flags of an extents query.
 *
 * @example
 * ```ts
 * import type { ExtentsFlags } from "./plugin.ts";
 * const flags: ExtentsFlags = { reqOne: true }; // reporting the first extent is enough
 * console.assert(flags.reqOne);
 * ```
 */
export interface ExtentsFlags {
  /** The client wants one extent only (the first). */
  reqOne: boolean;
}

/**
 * Extent type flag: the range is not allocated (a hole).
 *
 * @example
 * ```ts
 * import { EXTENT_HOLE, EXTENT_ZERO } from "./plugin.ts";
 * const sparse = EXTENT_HOLE | EXTENT_ZERO; // a hole that reads as zeroes
 * console.assert(sparse === 3);
 * ```
 */
export const EXTENT_HOLE = 1;
/**
 * Extent type flag: the range reads as zeroes.
 *
 * @example
 * ```ts
 * import { EXTENT_ZERO } from "./plugin.ts";
 * const preallocatedZeroes = EXTENT_ZERO; // allocated, but known to read as zeroes
 * console.assert(preallocatedZeroes === 2);
 * ```
 */
export const EXTENT_ZERO = 2;

/**
 * Where a plugin reports extents, from `offset` upwards, in order, without
 * gaps. `type` is a combination of {@linkcode EXTENT_HOLE} and
 * {@linkcode EXTENT_ZERO} (0 for allocated data).
 *
 * @example An `extents` callback: data in the first MiB, a hole after it
 * ```ts
 * import { EXTENT_HOLE, EXTENT_ZERO, type ExtentSink } from "./plugin.ts";
 * const MiB = 1024 * 1024;
 * function extents(count: number, offset: number, sink: ExtentSink): void {
 *   const end = offset + count;
 *   if (offset < MiB) sink.add(offset, Math.min(end, MiB) - offset, 0);
 *   if (end > MiB) {
 *     const start = Math.max(offset, MiB);
 *     sink.add(start, end - start, EXTENT_HOLE | EXTENT_ZERO);
 *   }
 * }
 * const seen: number[][] = [];
 * extents(2 * MiB, 0, { add: (o, l, t) => void seen.push([o, l, t]) });
 * console.assert(seen.length === 2 && seen[1][2] === 3);
 * ```
 */
export interface ExtentSink {
  /** Report that `length` bytes at `offset` have the given type. */
  add(offset: number, length: number, type: number): void;
}

/**
 * A value or a promise of it: every callback may be synchronous or async.
 *
 * @example
 * ```ts
 * import type { Awaitable } from "./plugin.ts";
 * const now: Awaitable<number> = 4096;
 * const later: Awaitable<number> = Promise.resolve(4096);
 * console.assert(now === await later);
 * ```
 */
export type Awaitable<T> = T | Promise<T>;

/**
 * Bytes that `pread` lends the server instead of filling its buffer: the
 * reply is written straight from them, saving a copy. Useful when the data
 * already sits in memory (a RAM disk, a cache, one large read that answers
 * several requests).
 *
 * The server reads `bytes` until the reply has been handed to the operating
 * system (or the connection has failed), then calls `release` once. Until
 * then the plugin must not reuse the memory for other data; a concurrent
 * write by the client to the same range may show through, which NBD allows
 * for requests in flight together.
 *
 * @example A RAM disk that lends views of itself
 * ```ts
 * import { definePlugin } from "./plugin.ts";
 * const disk = new Uint8Array(1 << 20).fill(7);
 * const ramdisk = definePlugin({
 *   name: "ramdisk",
 *   open: () => disk,
 *   getSize: (d) => d.length,
 *   pread: (d, buf, offset) => ({ bytes: d.subarray(offset, offset + buf.length) }),
 * });
 * const lent = await ramdisk.pread(disk, new Uint8Array(4), 8);
 * console.assert(lent !== undefined && lent.bytes[0] === 7);
 * ```
 */
export interface LentBytes {
  /** Exactly as many bytes as `pread`'s buffer holds; anything else fails the read (EIO). */
  bytes: Uint8Array;
  /** Called once, when the server no longer reads `bytes`. */
  release?(): void;
}

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
  /**
   * A promise that `pread` writes every byte of its buffer whenever it
   * succeeds. The server reuses read buffers, and zeroes each one before
   * `pread` so that a plugin that fills one partly cannot send a client the
   * bytes of an earlier reply; with this set it skips that pass over the
   * buffer, which costs about 5% of a 1 MiB read. The built-in plugins set it.
   */
  preadFillsBuffer?: boolean;

  /** One `key=value` from the command line, in order. Throw for an unknown key. */
  config?(key: string, value: string): Awaitable<void>;
  /** All parameters are in: check the required ones. */
  configComplete?(): Awaitable<void>;
  /** Acquire global resources, once, before the first client. */
  getReady?(): Awaitable<void>;
  /** Release global resources when the server stops (drain, close files). */
  unload?(): Awaitable<void>;

  /**
   * The exports `NBD_OPT_LIST` reports. When absent, or when it returns
   * null (as nbdkit's `nbdkit_use_default_export`, for a plugin that lists
   * exports in one mode only), the list is the server's one default export.
   */
  listExports?(ctx: ListContext): Awaitable<ExportInfo[] | null>;
  /** The canonical name of the default export "". */
  defaultExport?(ctx: ListContext): Awaitable<string>;

  /**
   * A client chose an export: return the handle that every later callback of
   * the connection gets. Throwing refuses the client. A client's
   * `NBD_OPT_INFO` opens a handle and closes it again, so this may run more
   * than once per connection.
   */
  open(ctx: OpenContext): Awaitable<H>;
  /** The handle is done with (the connection ends): release what `open` took. */
  close?(h: H): Awaitable<void>;

  /** The export's size in bytes, asked once per handle, after `open`. */
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
  /**
   * Whether `zero` is to be called; defaults to true. As in nbdkit, a
   * writable export always offers WRITE_ZEROES: without `zero`, or when this
   * says false, zeroes are written with `pwrite`.
   */
  canZero?(h: H): Awaitable<boolean>;
  /**
   * Whether zeroing is fast; defaults to true when zeroes are written with
   * `pwrite` (a fast zero then fails at once, as the spec allows), false when
   * `zero` is called.
   */
  canFastZero?(h: H): Awaitable<boolean>;
  /** FUA support; `emulate` (by flushing) when `flush` exists, `none` otherwise. */
  canFua?(h: H): Awaitable<SupportMode>;
  /** Whether several connections see a consistent export; false by default. */
  canMultiConn?(h: H): Awaitable<boolean>;
  /** CACHE support; `native` when `cache` exists, `none` otherwise. */
  canCache?(h: H): Awaitable<SupportMode>;
  /** Whether `extents` answers; defaults to whether `extents` exists. */
  canExtents?(h: H): Awaitable<boolean>;

  /**
   * Fill all of `buf` with the bytes at `offset` (the server has checked
   * that the range is within the size). Throw rather than leave it short.
   * The server owns `buf` again once this settles (read buffers are reused
   * for later replies): write into it only until then.
   *
   * Instead of filling `buf`, it may return bytes it already holds (see
   * {@linkcode LentBytes}); the server then sends those and leaves `buf`
   * unread.
   */
  pread(h: H, buf: Uint8Array, offset: number): Awaitable<void | LentBytes>;
  /**
   * Write all of `buf` at `offset` (within the size). The server owns `buf`
   * again once this settles: copy what you keep. Read it, never change it
   * (nbdkit's is `const`): zeroes written for a plugin without `zero` come
   * from one buffer that every connection shares.
   */
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
