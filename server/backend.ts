/**
 * A plugin seen through the protocol's eyes: capabilities computed once per
 * connection from the plugin's answers and defaults, emulation of what the
 * plugin lacks (FUA by flushing, zeroes by writing, cache by reading), the
 * thread model's locks, and extents clipped and merged.
 *
 * @module
 */
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from "../protocol/constants.ts";
import type {
  BlockSizeInfo,
  ExportProvider,
  ExportSession,
  ZeroOptions,
} from "../protocol/session.ts";
import { errnoOf, NbdError } from "../plugins/errors.ts";
import type {
  Awaitable,
  BlockSize,
  ExportInfo,
  LentBytes,
  Plugin,
  SupportMode,
  WriteFlags,
} from "../plugins/plugin.ts";
import { Mutex } from "./mutex.ts";
import { bit, tracedSession } from "./trace.ts";

/** Server-wide settings the backend needs. */
export interface BackendOptions {
  /** `-r`: every connection is read-only. */
  readonly: boolean;
  /** `-e`: the name of the default export. */
  exportName: string;
}

/**
 * Zeroes emulated with writes go out in pieces of up to this size, as
 * nbdkit's (its largest request): a plugin whose writes are remote calls makes
 * one per request. The buffer of zeroes is only ever read, so its pages stay
 * unallocated (the kernel's shared zero page) however large it grows.
 */
const ZERO_CHUNK = 64 * 1024 * 1024;
let zeroBuffer: Uint8Array | undefined;
/** CACHE emulated with reads reads pieces of this size (the plugin fills them: resident memory). */
const CACHE_CHUNK = 1024 * 1024;

/** A lock for `serialize_all_requests`, shared by every connection. */
const allRequests = new Mutex();

/** Plugin capability answers for one handle. */
interface Caps {
  write: boolean;
  flush: boolean;
  rotational: boolean;
  trim: boolean;
  /** Whether zeroes go to the plugin's `zero` (otherwise they are written). */
  zeroNative: boolean;
  fastZero: boolean;
  fua: SupportMode;
  multiConn: boolean;
  cache: SupportMode;
  extents: boolean;
}

async function capabilities<H>(p: Plugin<H>, h: H, readonly: boolean): Promise<Caps> {
  const write = !readonly && (p.canWrite ? await p.canWrite(h) : p.pwrite !== undefined);
  const flush = p.canFlush ? await p.canFlush(h) : p.flush !== undefined;
  // As nbdkit's: a writable export always takes WRITE_ZEROES, and canZero
  // only says whether `zero` is called or zeroes are written with `pwrite`.
  const zeroNative = write && p.zero !== undefined && (p.canZero ? await p.canZero(h) : true);
  return {
    write,
    flush,
    rotational: p.isRotational ? await p.isRotational(h) : false,
    trim: write && (p.canTrim ? await p.canTrim(h) : p.trim !== undefined),
    zeroNative,
    // Written zeroes can fail fast (ENOTSUP at once), so they count as fast.
    fastZero: write && (p.canFastZero ? await p.canFastZero(h) : !zeroNative),
    fua: !write ? "none" : p.canFua ? await p.canFua(h) : flush ? "emulate" : "none",
    multiConn: p.canMultiConn ? await p.canMultiConn(h) : false,
    cache: p.canCache ? await p.canCache(h) : p.cache !== undefined ? "native" : "none",
    extents: p.canExtents ? await p.canExtents(h) : p.extents !== undefined,
  };
}

function flagsOf(c: Caps): number {
  let f = NBD_FLAG_HAS_FLAGS;
  if (!c.write) f |= NBD_FLAG_READ_ONLY;
  if (c.flush) f |= NBD_FLAG_SEND_FLUSH;
  if (c.fua !== "none") f |= NBD_FLAG_SEND_FUA;
  if (c.rotational) f |= NBD_FLAG_ROTATIONAL;
  if (c.trim) f |= NBD_FLAG_SEND_TRIM;
  // Writable means WRITE_ZEROES: written with pwrite when not zero's (nbdkit's rule).
  if (c.write) f |= NBD_FLAG_SEND_WRITE_ZEROES;
  if (c.fastZero) f |= NBD_FLAG_SEND_FAST_ZERO;
  if (c.multiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (c.cache !== "none") f |= NBD_FLAG_SEND_CACHE;
  return f;
}

// The flags of every write: shared, so frozen.
const WRITE_FUA: WriteFlags = Object.freeze({ fua: true });
const WRITE_NO_FUA: WriteFlags = Object.freeze({ fua: false });

/** Whether a callback's result is a promise (or promise-like) to wait for. */
function isThenable(value: unknown): value is PromiseLike<unknown> {
  return value !== null && (typeof value === "object" || typeof value === "function") &&
    typeof (value as { then?: unknown }).then === "function";
}

/**
 * What `pread` returned, as a loan or nothing. Only an object with a byte
 * array is a loan: a plugin written as `(h, buf) => buf.fill(0)` returns its
 * buffer, which is no loan.
 */
function loanOf(result: unknown, buf: Uint8Array): LentBytes | undefined {
  if (result === null || typeof result !== "object" || !("bytes" in result)) return undefined;
  const { bytes, release } = result as LentBytes;
  const loan = {
    bytes,
    release: typeof release === "function" ? () => release.call(result) : undefined,
  };
  if (!(bytes instanceof Uint8Array)) {
    loan.release?.();
    throw new Error("pread lent something that is not a Uint8Array");
  }
  if (bytes.length !== buf.length) {
    loan.release?.();
    throw new Error(`pread lent ${bytes.length} bytes for a read of ${buf.length}`);
  }
  return loan;
}

/** An open plugin handle serving one connection. */
class PluginSession<H> implements ExportSession {
  readonly name: string;
  readonly size: bigint;
  readonly flags: number;
  readonly description: string | undefined;
  readonly blockSize: BlockSizeInfo | undefined;
  readonly readFillsBuffer: boolean;
  #p: Plugin<H>;
  #h: H;
  #caps: Caps;
  #lock: Mutex | null;
  #closed = false;

  constructor(
    p: Plugin<H>,
    h: H,
    name: string,
    size: bigint,
    caps: Caps,
    description: string | undefined,
    blockSize: BlockSizeInfo | undefined,
  ) {
    this.#p = p;
    this.#h = h;
    this.name = name;
    this.size = size;
    this.#caps = caps;
    this.flags = flagsOf(caps);
    this.description = description;
    this.blockSize = blockSize;
    this.readFillsBuffer = p.preadFillsBuffer === true;
    const model = p.threadModel ?? "parallel";
    this.#lock = model === "serialize_requests"
      ? new Mutex()
      : model === "serialize_all_requests"
      ? allRequests
      : null;
  }

  #call<T>(fn: () => T | Promise<T>): Promise<T> {
    if (this.#lock) return this.#lock.run(fn);
    return Promise.resolve(fn());
  }

  read(buf: Uint8Array, offset: number): Awaitable<LentBytes | undefined> {
    // Reads and writes call the plugin directly when nothing serialises
    // them, and answer synchronously when the plugin does: no closure, no
    // promise and no microtask turn per request.
    if (this.#lock) {
      return this.#lock.run(() => this.#p.pread(this.#h, buf, offset)).then((r) => loanOf(r, buf));
    }
    const result: unknown = this.#p.pread(this.#h, buf, offset);
    if (isThenable(result)) return Promise.resolve(result).then((r) => loanOf(r, buf));
    return loanOf(result, buf);
  }

  write(buf: Uint8Array, offset: number, fua: boolean): Awaitable<void> {
    if (fua || this.#lock) return this.#writeSlowly(buf, offset, fua);
    const result: unknown = this.#p.pwrite!(this.#h, buf, offset, WRITE_NO_FUA);
    if (isThenable(result)) return Promise.resolve(result).then(() => {});
  }

  async #writeSlowly(buf: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const native = fua && this.#caps.fua === "native";
    const flags = native ? WRITE_FUA : WRITE_NO_FUA;
    if (this.#lock) await this.#lock.run(() => this.#p.pwrite!(this.#h, buf, offset, flags));
    else await this.#p.pwrite!(this.#h, buf, offset, flags);
    if (fua && !native) await this.flush();
  }

  async flush(): Promise<void> {
    if (this.#p.flush) await this.#call(() => this.#p.flush!(this.#h));
  }

  async trim(count: number, offset: number, fua: boolean): Promise<void> {
    const native = fua && this.#caps.fua === "native";
    await this.#call(() => this.#p.trim!(this.#h, count, offset, { fua: native }));
    if (fua && !native) await this.flush();
  }

  async zero(count: number, offset: number, o: ZeroOptions): Promise<void> {
    const native = o.fua && this.#caps.fua === "native";
    if (this.#caps.zeroNative) {
      try {
        await this.#call(() =>
          this.#p.zero!(this.#h, count, offset, {
            fua: native,
            mayTrim: o.mayTrim,
            fastZero: o.fastZero,
          })
        );
        if (o.fua && !native) await this.flush();
        return;
      } catch (err) {
        // A plugin may refuse with ENOTSUP (or a system error's EOPNOTSUPP) to
        // ask for the emulation, as in nbdkit.
        if (errnoOf(err) !== "ENOTSUP" || o.fastZero) throw err;
      }
    }
    if (o.fastZero) throw new NbdError("ENOTSUP", "fast zero is not supported by this plugin");
    const largest = Math.min(count, ZERO_CHUNK);
    if (!zeroBuffer || zeroBuffer.length < largest) zeroBuffer = new Uint8Array(largest);
    // FUA goes with each write when the plugin does FUA itself, as nbdkit's.
    const flags = native ? WRITE_FUA : WRITE_NO_FUA;
    for (let done = 0; done < count; done += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, count - done);
      await this.#call(() =>
        this.#p.pwrite!(this.#h, zeroBuffer!.subarray(0, n), offset + done, flags)
      );
    }
    if (o.fua && !native) await this.flush();
  }

  async cache(count: number, offset: number): Promise<void> {
    if (this.#caps.cache === "native" && this.#p.cache) {
      await this.#call(() => this.#p.cache!(this.#h, count, offset));
      return;
    }
    const scratch = new Uint8Array(Math.min(count, CACHE_CHUNK));
    for (let done = 0; done < count; done += scratch.length) {
      const n = Math.min(scratch.length, count - done);
      await this.read(scratch.subarray(0, n), offset + done);
    }
  }

  async extents(count: number, offset: number, reqOne: boolean): Promise<number[]> {
    if (!this.#caps.extents || !this.#p.extents) return [count, 0];
    const end = offset + count;
    const pairs: number[] = [];
    let pos = offset;
    let error: string | null = null;
    const sink = {
      add: (start: number, length: number, type: number) => {
        if (error !== null || pos >= end) return;
        // A plugin in JavaScript may pass anything: NaN or a string would put a
        // zero or garbage length on the wire, which the spec forbids.
        if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length)) {
          error = `plugin reported an extent that is not integers: ${String(start)}, ` +
            `${String(length)}`;
          return;
        }
        if (length <= 0) return;
        const stop = Math.min(start + length, end);
        if (stop <= pos) return; // before the range, or already covered
        if (start > pos) {
          error = `plugin reported extents with a gap: expected offset ${pos}, got ${start}`;
          return;
        }
        const t = type & 3;
        const n = pairs.length;
        if (n > 0 && pairs[n - 1] === t) pairs[n - 2] += stop - pos;
        else pairs.push(stop - pos, t);
        pos = stop;
      },
    };
    await this.#call(() => this.#p.extents!(this.#h, count, offset, { reqOne }, sink));
    if (error !== null) throw new NbdError("EIO", error);
    if (pairs.length === 0) throw new NbdError("EIO", "plugin reported no extents");
    return reqOne ? pairs.slice(0, 2) : pairs;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#p.close) await this.#p.close(this.#h);
  }
}

const powerOf2 = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

/**
 * A plugin's block sizes as the handshake sends them, or undefined for "no
 * constraints" (absent, or all three 0, as nbdkit allows scripts to say).
 * Sizes the NBD spec does not allow fail the open, with nbdkit's messages:
 * clients trust them (a minimum of 3 would have every request misaligned).
 * A maximum of -1 stands for 0xffffffff, "no limit".
 *
 * @example
 * ```ts
 * import { checkedBlockSize } from "./backend.ts";
 * checkedBlockSize({ minimum: 512, preferred: 4096, maximum: -1 }); // maximum: 0xffffffff
 * checkedBlockSize({ minimum: 0, preferred: 0, maximum: 0 }); // undefined
 * ```
 */
export function checkedBlockSize(b: BlockSize | undefined): BlockSizeInfo | undefined {
  if (!b || (b.minimum === 0 && b.preferred === 0 && b.maximum === 0)) return undefined;
  const { minimum, preferred } = b;
  const maximum = b.maximum === -1 ? 0xffffffff : b.maximum;
  const fail = (what: string) => {
    throw new NbdError("EINVAL", `plugin must set ${what}`);
  };
  if (!(minimum >= 1 && minimum <= 65536)) fail("minimum block size between 1 and 64K");
  if (!powerOf2(minimum)) fail("minimum block size to a power of 2");
  if (!powerOf2(preferred)) fail("preferred block size to a power of 2");
  if (preferred < 512 || preferred > 32 * 1024 * 1024) {
    fail("preferred block size between 512 and 32M");
  }
  if (!Number.isInteger(maximum) || maximum > 0xffffffff) fail("maximum block size below 4G");
  if (maximum !== 0xffffffff && maximum % minimum !== 0) {
    fail("maximum block size to -1 or a multiple of minimum block size");
  }
  if (minimum > preferred || preferred > maximum) {
    fail("minimum block size <= preferred <= maximum");
  }
  return { minimum, preferred, maximum };
}

/**
 * The export provider of one connection, backed by a plugin.
 *
 * @param plugin The configured, ready plugin.
 * @param options Server settings.
 * @param connection The connection's number (for the plugin's messages).
 * @param trace With `-v`: where each call of the plugin is logged.
 * @returns The provider the handshake uses.
 */
export function pluginProvider<H>(
  plugin: Plugin<H>,
  options: BackendOptions,
  connection: number,
  trace?: (message: string) => void,
): ExportProvider {
  const ro = bit(options.readonly);
  return {
    async listExports(tls: boolean): Promise<ExportInfo[]> {
      trace?.(`list_exports readonly=${ro} tls=${bit(tls)}`);
      const listed = await plugin.listExports?.({ readonly: options.readonly, tls });
      return listed ?? [{ name: options.exportName }];
    },

    async open(name: string, tls: boolean): Promise<ExportSession> {
      let canonical = name;
      if (name === "" && plugin.defaultExport) {
        canonical = await plugin.defaultExport({ readonly: options.readonly, tls });
        trace?.(`default_export readonly=${ro} tls=${bit(tls)}: "${canonical}"`);
      }
      trace?.(`open readonly=${ro} exportname="${canonical}" tls=${bit(tls)}`);
      const h = await plugin.open({
        readonly: options.readonly,
        exportName: canonical,
        tls,
        connection,
      });
      try {
        const rawSize = await plugin.getSize(h);
        const size = BigInt(rawSize);
        if (size < 0n) throw new NbdError("EIO", `plugin reported a negative size: ${rawSize}`);
        const caps = await capabilities(plugin, h, options.readonly);
        const description = plugin.exportDescription
          ? await plugin.exportDescription(h)
          : undefined;
        const blockSize = plugin.blockSize
          ? checkedBlockSize(await plugin.blockSize(h))
          : undefined;
        const session = new PluginSession(plugin, h, canonical, size, caps, description, blockSize);
        return trace ? tracedSession(session, trace) : session;
      } catch (err) {
        if (plugin.close) await plugin.close(h);
        throw err;
      }
    },
  };
}
