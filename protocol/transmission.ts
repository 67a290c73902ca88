/**
 * The transmission phase: read a request, validate it, dispatch it to the
 * export, send the reply. Requests run concurrently up to a limit; replies
 * go out as they complete, each written whole.
 *
 * @module
 */
import { type ByteReader, EndOfStream } from "./byte_reader.ts";
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
} from "./constants.ts";
import { BASE_ALLOCATION_ID } from "./handshake.ts";
import { commandName } from "./names.ts";
import type { ExportSession } from "./session.ts";
import {
  CHUNK_HEADER,
  type Cookie,
  ProtocolError,
  putChunkHeader,
  putSimpleHeader,
  SIMPLE_HEADER,
  structuredError,
} from "./wire.ts";
import { ERRNO_VALUES, errnoOf, messageOf } from "../plugins/errors.ts";
import type { LentBytes } from "../plugins/plugin.ts";

/** The largest READ or WRITE payload: nbdkit's limit. */
export const MAX_REQUEST_SIZE = 64 * 1024 * 1024;

/** Policy of the transmission phase. */
export interface TransmissionOptions {
  /** Structured replies were negotiated. */
  structured: boolean;
  /** `base:allocation` was selected. */
  baseAllocation: boolean;
  /** Requests in flight at once on this connection (`-t`). */
  maxInFlight: number;
  /** Log one error line (the server adds its prefix). */
  error(message: string): void;
  /** Log one debug line. */
  debug(message: string): void;
  /** True once the server is shutting down: new requests get ESHUTDOWN. */
  shuttingDown(): boolean;
  /**
   * Aborted when the server starts shutting down. The loop then goes on
   * reading, so that requests the client has already sent are answered with
   * ESHUTDOWN rather than lost with the connection, until the requests in
   * flight have finished and {@linkcode TransmissionOptions.lingerMs} more
   * have passed; then it stops reading and returns. Without it, the caller
   * ends the loop by cancelling the reader.
   */
  stopSignal?: AbortSignal;
  /** See `stopSignal` (default {@linkcode SHUTDOWN_LINGER_MS}). */
  lingerMs?: number;
  /**
   * Close the connection at once. Used when a shutdown finds the client not
   * taking its replies (see {@linkcode SHUTDOWN_WRITE_STALL_MS}): a write
   * blocked on a full socket can only be ended by closing the socket.
   */
  hangUp?(): void;
}

/**
 * During a shutdown, a connection with replies waiting to be written and
 * none written for this long is hung up: a client that stopped reading must
 * not hold the server up for ever.
 */
export const SHUTDOWN_WRITE_STALL_MS = 5000;

/**
 * Reply bytes handed to the transport and not yet written, beyond which the
 * loop stops reading requests until the client has taken some. Small replies
 * go out in batches that no request awaits: without this bound a client that
 * sends READs and never reads the replies made the server queue 3.5 GiB in
 * 8 seconds (see tests/fuzz_test.ts). nbdkit is bounded the same way, by
 * its threads blocking in send().
 */
const MAX_QUEUED_BYTES = 4 * 1024 * 1024;

/**
 * How long a connection keeps answering ESHUTDOWN once its requests in
 * flight have finished during a shutdown: long enough to read what a client
 * had sent before it could know (already in the socket, or on its way),
 * short enough that idle clients do not hold the server up.
 */
export const SHUTDOWN_LINGER_MS = 200;

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

/**
 * READ reply buffers and WRITE payloads are reused: a fresh multi-megabyte buffer
 * costs page faults on every request (measured: 1 MiB fresh 234 µs, reused
 * 48 µs on Deno). Replies of this size or more are written on their own, and
 * runtimes resolve such a write only once they no longer need the chunk (see
 * runtime/types.ts), so a buffer goes back to the pool when its write
 * resolves; smaller replies are copied into the batch when sent.
 */
const POOL_MIN = 64 * 1024;
/**
 * WRITE payloads are pooled from this size down: each comes back when the
 * plugin's `pwrite` settles, with no write of ours in between. A fresh 4 KiB
 * payload cost a zeroed allocation and its free on every request (malloc,
 * free and memset were 12% of the server's samples under 4 KiB random writes).
 */
const WRITE_POOL_MIN = 4096;
/**
 * READ reply buffers are pooled from this size up: fresh ones cost Bun about
 * 10% of the server's samples under 4 KiB random reads (zeroing and faulting
 * in new memory). Smaller ones are left to the allocator.
 */
const READ_POOL_MIN = 4096;
/**
 * Buffers kept per size: nbdcopy keeps 4 × 64 requests of 256 KiB in flight,
 * and with 16 kept most of them were fresh (the noop plugin's server cost
 * 0.38–0.64 CPU-s per GiB copied, 0.32–0.54 with 256).
 */
const POOL_PER_SIZE = 256;
/**
 * All pooled buffers together, server wide. Without a bound the pool kept up
 * to {@linkcode POOL_PER_SIZE} buffers of every size ever read, forever: a client reading 1 MiB + 1,
 * 1 MiB + 2, … made the server hold 1.5 GiB after 1500 reads (see the
 * memory tests in tests/fuzz_test.ts).
 */
const POOL_MAX_BYTES = 64 * 1024 * 1024;
let pooledBytes = 0;

/**
 * Where a read reply's data starts in its buffer, its header (16 or 28
 * bytes) just before. A copy into a buffer 16 or 28 bytes past a page-aligned
 * start runs at 6–7 GiB/s on Bun (JavaScriptCore's `set`), 32 bytes past it at
 * 16–17 GiB/s, as fast as on Deno and Node, where the offset does not matter:
 * on Bun a 1 MiB read spent more time in that copy than in the socket.
 */
const READ_DATA_AT = 32;

/** Microtask turns a reply waits for others to join its write. */
const FLUSH_TURNS = 12;
const pool = new Map<number, Uint8Array<ArrayBuffer>[]>();

// The free list of the size used last is kept at hand, and stays in the pool
// while empty: a connection that takes and gives back one 4 KiB buffer per
// request made three map operations, an array and its growth per request
// (a twentieth of the server's samples under 4 KiB random writes).
let hotLength = -1;
let hotList: Uint8Array<ArrayBuffer>[] = [];

/** The free list for `length`, made when `create`; it becomes the hot one. */
function freeList(length: number, create: boolean): Uint8Array<ArrayBuffer>[] | undefined {
  if (length === hotLength) return hotList;
  let list = pool.get(length);
  if (!list) {
    if (!create) return undefined;
    pool.set(length, list = []);
  }
  // No empty entry per size ever seen: only the hot list may stay empty.
  if (hotLength !== -1 && hotList.length === 0) pool.delete(hotLength);
  hotLength = length;
  hotList = list;
  return list;
}

/**
 * A buffer of `length` bytes, zeroed (unless `zeroed` is false, for a buffer
 * about to be filled whole) so that a plugin that fills it partly leaks nothing.
 */
function takeBuffer(length: number, zeroed = true, min = POOL_MIN): Uint8Array<ArrayBuffer> {
  if (length < min) return new Uint8Array(length);
  const buf = freeList(length, false)?.pop();
  if (!buf) return new Uint8Array(length);
  pooledBytes -= length;
  return zeroed ? buf.fill(0) : buf;
}

function giveBuffer(buf: Uint8Array<ArrayBuffer>, min = POOL_MIN): void {
  if (buf.length < min) return;
  if (pooledBytes + buf.length > POOL_MAX_BYTES) return; // over the bound: left to the GC
  const free = freeList(buf.length, true)!;
  if (free.length < POOL_PER_SIZE) {
    free.push(buf);
    pooledBytes += buf.length;
  }
}
const TWO32 = 0x1_0000_0000;

const KNOWN_FLAGS = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF |
  NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;

/** A request, decoded: the reply headers take it as its cookie. */
interface Request extends Cookie {
  type: number;
  flags: number;
  offset: number;
  count: number;
  payload: Uint8Array<ArrayBuffer> | null;
}

/** The reason a request is refused before the export sees it. */
interface Refusal {
  errno: number;
  message: string;
}

/**
 * Validate a request as nbdkit does, in its order (so that a request with
 * two faults gets nbdkit's errno): the command, a write to a read-only
 * export, the range, the flags, the size limit, then whether the export
 * offers the command. Returns a refusal, or null when valid. `offHi`/`offLo`
 * are the halves of the 64-bit offset.
 */
function validate(
  s: ExportSession,
  o: TransmissionOptions,
  type: number,
  flags: number,
  offHi: number,
  offLo: number,
  count: number,
): Refusal | null {
  const eflags = s.flags;
  switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
      break;
    default:
      return refusal(type, NBD_EINVAL, "unknown command");
  }
  // A write to a read-only export is EPERM whatever else is wrong with it.
  const writes = type === NBD_CMD_WRITE || type === NBD_CMD_TRIM || type === NBD_CMD_WRITE_ZEROES;
  if (writes && (eflags & NBD_FLAG_READ_ONLY)) {
    return refusal(type, NBD_EPERM, "write request on a read-only export");
  }
  const range = rangeRefusal(s, type, offHi, offLo, count);
  if (range) return range;
  if ((flags & ~KNOWN_FLAGS) !== 0) {
    return refusal(type, NBD_EINVAL, `unknown flags 0x${flags.toString(16)}`);
  }
  if ((flags & (NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) && type !== NBD_CMD_WRITE_ZEROES) {
    return refusal(
      type,
      NBD_EINVAL,
      "NO_HOLE or FAST_ZERO flag on a command other than WRITE_ZEROES",
    );
  }
  if ((flags & NBD_CMD_FLAG_DF) && (type !== NBD_CMD_READ || !o.structured)) {
    return refusal(
      type,
      NBD_EINVAL,
      "DF flag without structured replies or on a command other than READ",
    );
  }
  if ((flags & NBD_CMD_FLAG_REQ_ONE) && type !== NBD_CMD_BLOCK_STATUS) {
    return refusal(type, NBD_EINVAL, "REQ_ONE flag on a command other than BLOCK_STATUS");
  }
  // FUA on a command that does not write (READ, FLUSH, CACHE, BLOCK_STATUS)
  // is accepted and means nothing: the spec says a server that advertised
  // FUA MUST accept it on every command, since clients are known to set it.
  if ((flags & NBD_CMD_FLAG_FUA) && !(eflags & NBD_FLAG_SEND_FUA)) {
    return refusal(type, NBD_EINVAL, "FUA flag not advertised");
  }
  // nbdkit passes this one to the plugin (and 1.32 fails an assertion there).
  if ((flags & NBD_CMD_FLAG_FAST_ZERO) && !(eflags & NBD_FLAG_SEND_FAST_ZERO)) {
    return refusal(type, NBD_EINVAL, "FAST_ZERO flag not advertised");
  }
  if ((type === NBD_CMD_READ || type === NBD_CMD_WRITE) && count > MAX_REQUEST_SIZE) {
    return refusal(
      type,
      NBD_ENOMEM,
      `count ${count} is larger than the maximum ${MAX_REQUEST_SIZE}`,
    );
  }
  if (type === NBD_CMD_FLUSH && !(eflags & NBD_FLAG_SEND_FLUSH)) {
    return refusal(type, NBD_EINVAL, "flush not supported");
  }
  if (type === NBD_CMD_TRIM && !(eflags & NBD_FLAG_SEND_TRIM)) {
    return refusal(type, NBD_EINVAL, "trim not supported");
  }
  if (type === NBD_CMD_WRITE_ZEROES && !(eflags & NBD_FLAG_SEND_WRITE_ZEROES)) {
    return refusal(type, NBD_EINVAL, "write zeroes not supported");
  }
  if (type === NBD_CMD_CACHE && !(eflags & NBD_FLAG_SEND_CACHE)) {
    return refusal(type, NBD_EINVAL, "cache not supported");
  }
  if (type === NBD_CMD_BLOCK_STATUS && !(o.structured && o.baseAllocation)) {
    return refusal(type, NBD_EINVAL, "no metadata context was negotiated");
  }
  return null;
}

/** A refusal of a request of this type; the command's name is looked up only for a refusal. */
function refusal(type: number, errno: number, why: string): Refusal {
  return { errno, message: `invalid request: ${commandName(type)}: ${why}` };
}

/** The refusal of a request's offset and count, if anything is wrong with them. */
function rangeRefusal(
  s: ExportSession,
  type: number,
  offHi: number,
  offLo: number,
  count: number,
): Refusal | null {
  if (type === NBD_CMD_FLUSH) {
    return offHi !== 0 || offLo !== 0 || count !== 0
      ? refusal(type, NBD_EINVAL, "offset and count must be zero")
      : null;
  }
  // The spec's SHOULD (and nbdkit): writing past the end is "no space";
  // nbdkit counts a zero length as out of range too, so it is the same.
  const beyond = type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
  if (count === 0) return refusal(type, beyond, "count is zero");
  const offset = offHi * TWO32 + offLo;
  if (offset + count > MAX_SAFE) {
    const end = ((BigInt(offHi) << 32n) | BigInt(offLo)) + BigInt(count);
    const at = end - BigInt(count);
    if (end > s.size) {
      return refusal(type, beyond, `offset ${at} + count ${count} > size ${s.size}`);
    }
    // In range, but not exact as a JavaScript number: EINVAL, which every
    // client knows (EOVERFLOW is only for a DF read too large for one chunk).
    return refusal(type, NBD_EINVAL, `offset ${at} is beyond what this server handles (2^53)`);
  }
  // A number against a bigint compares exactly, with no bigint made per request.
  if (offset + count > s.size) {
    return refusal(type, beyond, `offset ${offset} + count ${count} > size ${s.size}`);
  }
  return null;
}

/** The big-endian 32-bit number at `at`. */
function be32(b: Uint8Array, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
}

/** The header of a successful READ reply to `req`, at the start of `out`. */
function putReadHeader(out: Uint8Array, req: Request, structured: boolean): void {
  if (!structured) return putSimpleHeader(out, req, 0);
  putChunkHeader(out, req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + req.count);
  const view = new DataView(out.buffer, out.byteOffset + CHUNK_HEADER, 8);
  view.setUint32(0, Math.floor(req.offset / TWO32));
  view.setUint32(4, req.offset % TWO32);
}

/**
 * Serve requests until the client disconnects.
 *
 * @param reader The client's bytes, positioned at the first request.
 * @param writer Where replies go.
 * @param session The export.
 * @param options Policy and logging.
 * @throws {ProtocolError} When the client breaks the framing (the connection must end).
 */
export async function transmission(
  reader: ByteReader,
  writer: WritableStreamDefaultWriter<Uint8Array>,
  session: ExportSession,
  options: TransmissionOptions,
): Promise<void> {
  const { structured } = options;
  let inFlight = 0;
  let wake: (() => void) | null = null;
  let broken = false;
  let draining = false; // the server is shutting down
  let over = false;
  let linger: ReturnType<typeof setTimeout> | undefined;

  // Once draining with nothing in flight, read for a little longer, then
  // stop: cancelling the reader ends the loop as the end of input would.
  const armLinger = () => {
    if (!draining || inFlight > 0 || linger !== undefined || over) return;
    linger = setTimeout(() => {
      options.debug("shutting down: no more requests are read on this connection");
      reader.cancel();
    }, options.lingerMs ?? SHUTDOWN_LINGER_MS);
  };
  let stallCheck: ReturnType<typeof setInterval> | undefined;
  const onStop = () => {
    draining = true;
    armLinger();
    let seen = writesDone;
    stallCheck = setInterval(() => {
      if (pendingWrites > 0 && writesDone === seen) {
        options.debug("shutting down: the client is not reading its replies; hanging up");
        clearInterval(stallCheck);
        if (options.hangUp) options.hangUp();
        else reader.cancel();
      }
      seen = writesDone;
    }, SHUTDOWN_WRITE_STALL_MS);
  };

  // Small replies are gathered and written together: one write (one system
  // call) for the replies to a burst of pipelined requests. The batch goes out
  // when the loop is about to wait for input, or, when it already waits, once
  // the current microtasks have run. Large replies flush the batch and go out
  // on their own, in order. A small reply is copied into the batch when it is
  // sent, so its buffer is free again at once (and may be pooled). Allocated
  // on the first reply: a connection that only idles costs nothing.
  let batch: Uint8Array | null = null;
  let batchView: DataView | null = null; // over batch, made with it (batch is never replaced)
  let batchBytes = 0;
  let waitingForInput = false;
  let flushQueued = false;
  let lastWrite: Promise<void> = Promise.resolve();

  // Replies in batches are awaited by nobody: their bytes are counted until
  // written (see MAX_QUEUED_BYTES). Large replies are awaited by their
  // requests, so bounded by the requests in flight.
  let queuedBytes = 0;
  let pendingWrites = 0;
  let writesDone = 0;
  const write = (bytes: Uint8Array, batched = false): Promise<void> => {
    const n = batched ? bytes.length : 0;
    queuedBytes += n;
    pendingWrites++;
    lastWrite = writer.write(bytes).then(() => {
      queuedBytes -= n;
      pendingWrites--;
      writesDone++;
    }, () => {
      queuedBytes -= n;
      pendingWrites--;
      broken = true;
    });
    return lastWrite;
  };

  const flush = (): void => {
    flushQueued = false;
    if (batchBytes === 0 || broken) return;
    const bytes = batch!.slice(0, batchBytes);
    batchBytes = 0;
    write(bytes, true);
  };

  // Requests dispatched together finish a few microtask turns apart (each
  // await in the plugin call chain is one): waiting some turns lets their
  // replies join the batch, at no cost in latency (no timer, no I/O).
  const deferFlush = async (): Promise<void> => {
    for (let i = 0; i < FLUSH_TURNS; i++) await undefined;
    flush();
  };

  /** Room for `n` more bytes in the batch: where they go. */
  const reserve = (n: number): number => {
    if (!batch) {
      batch = new Uint8Array(POOL_MIN);
      batchView = new DataView(batch.buffer);
    }
    if (batchBytes + n > batch.length) flush();
    const at = batchBytes;
    batchBytes += n;
    return at;
  };

  /** The batch has grown: send it when full, or once the current turns are over. */
  const queued = (): void => {
    if (batchBytes === batch!.length) {
      flush();
    } else if (waitingForInput && !flushQueued) {
      flushQueued = true;
      deferFlush();
    }
  };

  /**
   * Send a reply: a small one is copied into the batch (nothing to wait
   * for: undefined), a large one is written on its own and the promise
   * settles once its bytes may be reused.
   */
  const send = (bytes: Uint8Array): Promise<void> | undefined => {
    if (broken) return undefined;
    if (bytes.length >= POOL_MIN) {
      flush();
      return write(bytes);
    }
    const at = reserve(bytes.length); // first: it makes the batch
    batch!.set(bytes, at);
    queued();
    return undefined;
  };

  // The commonest reply (every write's) is put straight into the batch: a
  // fresh 16-byte array per reply, and the DataView over it, cost more than
  // the rest of the reply's path.
  const sendSimple = (cookie: Cookie, errno: number): void => {
    if (broken) return;
    const at = reserve(SIMPLE_HEADER);
    batchView!.setUint32(at, NBD_SIMPLE_REPLY_MAGIC);
    batchView!.setUint32(at + 4, errno);
    batchView!.setUint32(at + 8, cookie.cookieHi);
    batchView!.setUint32(at + 12, cookie.cookieLo);
    queued();
  };

  const sendError = (req: Request, errno: number): Promise<void> | undefined => {
    if (structured && (req.type === NBD_CMD_READ || req.type === NBD_CMD_BLOCK_STATUS)) {
      return send(structuredError(req, errno));
    }
    sendSimple(req, errno);
  };

  /**
   * A request failed: log it and send its error. Anything a plugin throws (a
   * string, undefined, an object without a prototype…) fails this request
   * only, with EIO unless it says otherwise.
   */
  const fail = (req: Request, err: unknown): Promise<void> | undefined => {
    options.error(`${commandName(req.type)}: ${messageOf(err)}`);
    let errno = ERRNO_VALUES[errnoOf(err)];
    // As the spec asks, and nbdkit does: ENOTSUP only for a fast zero and
    // EOVERFLOW only for an unfragmented read; elsewhere a client may not
    // know them, and gets EINVAL.
    if (errno === NBD_ENOTSUP && !(req.flags & NBD_CMD_FLAG_FAST_ZERO)) errno = NBD_EINVAL;
    if (errno === NBD_EOVERFLOW && !(req.flags & NBD_CMD_FLAG_DF)) errno = NBD_EINVAL;
    return sendError(req, errno);
  };

  const release = () => {
    inFlight--;
    const w = wake;
    wake = null;
    w?.();
    armLinger();
  };

  /** Send the reply of a READ whose data is in `out` (after READ_DATA_AT) or lent. */
  const replyRead = (
    req: Request,
    out: Uint8Array<ArrayBuffer>,
    lent: LentBytes | void,
  ): Promise<void> | undefined => {
    // The header goes right before the data, which starts at READ_DATA_AT.
    const head = structured ? CHUNK_HEADER + 8 : SIMPLE_HEADER;
    if (lent) {
      giveBuffer(out, READ_POOL_MIN);
      return replyLent(req, head, lent);
    }
    const reply = out.subarray(READ_DATA_AT - head);
    putReadHeader(reply, req, structured);
    // Reusable once sent: a small reply has been copied into the batch, a
    // large one written (see send).
    const sent = send(reply);
    if (!sent) {
      giveBuffer(out, READ_POOL_MIN);
      return undefined;
    }
    return sent.then(() => giveBuffer(out, READ_POOL_MIN));
  };

  /** The plugin's own bytes go out as they are, after a header of their own. */
  const replyLent = async (req: Request, head: number, lent: LentBytes): Promise<void> => {
    try {
      const header = new Uint8Array(head);
      putReadHeader(header, req, structured);
      send(header);
      await send(lent.bytes);
    } finally {
      // The reply is out: a failing release must not become a second one.
      try {
        lent.release?.();
      } catch (err) {
        options.error(`NBD_CMD_READ: releasing the lent bytes: ${messageOf(err)}`);
      }
    }
  };

  /**
   * Start a request. Reads and writes that the plugin answers synchronously
   * are answered at once (undefined): most requests to a RAM disk cost no
   * promise and no microtask turn. Otherwise, a promise that settles (never
   * rejects) once the request is over and its reply sent.
   */
  const start = (req: Request): Promise<void> | undefined => {
    try {
      if (req.type === NBD_CMD_READ) {
        const out = takeBuffer(READ_DATA_AT + req.count, !session.readFillsBuffer, READ_POOL_MIN);
        const lent = session.read(out.subarray(READ_DATA_AT), req.offset);
        if (lent instanceof Promise) {
          return lent.then((l) => replyRead(req, out, l)).catch((err) => fail(req, err));
        }
        return replyRead(req, out, lent);
      }
      if (req.type === NBD_CMD_WRITE) {
        // The plugin may not keep the buffer past its promise (see plugins/plugin.ts).
        const payload = req.payload!;
        const written = session.write(payload, req.offset, (req.flags & NBD_CMD_FLAG_FUA) !== 0);
        if (written instanceof Promise) {
          return written.then(() => {
            giveBuffer(payload, WRITE_POOL_MIN);
            sendSimple(req, 0);
          }, (err) => fail(req, err));
        }
        giveBuffer(payload, WRITE_POOL_MIN);
        sendSimple(req, 0);
        return undefined;
      }
    } catch (err) {
      return fail(req, err);
    }
    return handle(req);
  };

  /** The other commands, which are rare: plain async code. */
  const handle = async (req: Request): Promise<void> => {
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (req.type) {
        case NBD_CMD_FLUSH:
          await session.flush();
          break;
        case NBD_CMD_TRIM:
          await session.trim(req.count, req.offset, fua);
          break;
        case NBD_CMD_CACHE:
          await session.cache(req.count, req.offset);
          break;
        case NBD_CMD_WRITE_ZEROES:
          await session.zero(req.count, req.offset, {
            fua,
            mayTrim: (req.flags & NBD_CMD_FLAG_NO_HOLE) === 0,
            fastZero: (req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
          });
          break;
        case NBD_CMD_BLOCK_STATUS: {
          const pairs = await session.extents(
            req.count,
            req.offset,
            (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0,
          );
          const length = 4 + pairs.length * 4;
          const out = new Uint8Array(CHUNK_HEADER + length);
          putChunkHeader(out, req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, length);
          const view = new DataView(out.buffer, CHUNK_HEADER, length);
          view.setUint32(0, BASE_ALLOCATION_ID);
          for (let i = 0; i < pairs.length; i++) view.setUint32(4 + i * 4, pairs[i]);
          await send(out);
          return;
        }
      }
      sendSimple(req, 0);
    } catch (err) {
      await fail(req, err);
    }
  };

  options.stopSignal?.addEventListener("abort", onStop);
  if (options.stopSignal?.aborted) onStop();
  try {
    while (!broken) {
      if (queuedBytes > MAX_QUEUED_BYTES) {
        // Backpressure (see MAX_QUEUED_BYTES): wait until the client has
        // taken what was written so far.
        flush();
        await lastWrite;
        continue;
      }
      let head = reader.take(28);
      try {
        if (!head) {
          flush();
          waitingForInput = true;
          head = await reader.read(28);
          waitingForInput = false;
        }
      } catch (err) {
        if (err instanceof EndOfStream) {
          if (err.partial) options.debug("client closed the connection in the middle of a request");
          else options.debug("client closed the connection");
          return;
        }
        throw err;
      }
      // By hand rather than through a DataView: one object less per request.
      const magic = be32(head, 0);
      if (magic !== NBD_REQUEST_MAGIC) {
        throw new ProtocolError(`invalid request: bad magic 0x${magic.toString(16)}`);
      }
      const flags = (head[4] << 8) | head[5];
      const type = (head[6] << 8) | head[7];
      const cookieHi = be32(head, 8);
      const cookieLo = be32(head, 12);
      const offHi = be32(head, 16);
      const offLo = be32(head, 20);
      const count = be32(head, 24);

      if (type === NBD_CMD_DISC) {
        options.debug("client sent NBD_CMD_DISC");
        return;
      }

      const refusal = validate(session, options, type, flags, offHi, offLo, count);
      let payload: Uint8Array<ArrayBuffer> | null = null;
      if (type === NBD_CMD_WRITE) {
        if (reader.buffered < count) flush(); // do not hold replies while the payload trickles in
        if (refusal || draining || options.shuttingDown()) {
          // A payload that will not be written is drained in the stream's own
          // chunks: a refused request (over the maximum, out of range, on a
          // read-only export) never costs an allocation of its `count`.
          await reader.skip(count);
        } else {
          // Kept past the next read (the request runs while others are read): never a view of the reader's buffer.
          payload = takeBuffer(count, false, WRITE_POOL_MIN);
          if (!reader.takeInto(payload)) payload = await reader.readInto(payload);
        }
      }

      const req: Request = {
        type,
        flags,
        cookieHi,
        cookieLo,
        offset: offHi * TWO32 + offLo,
        count,
        payload,
      };
      if (refusal) {
        options.error(refusal.message);
        await sendError(req, refusal.errno);
        continue;
      }
      if (draining || options.shuttingDown()) {
        await sendError(req, NBD_ESHUTDOWN);
        continue;
      }
      while (inFlight >= options.maxInFlight) {
        await new Promise<void>((resolve) => wake = resolve);
      }
      if (draining || options.shuttingDown()) {
        // The stop came while it waited for a slot: nothing new starts (as nbdkit).
        await sendError(req, NBD_ESHUTDOWN);
        continue;
      }
      const running = start(req);
      if (!running) continue;
      inFlight++;
      // `start` catches everything; the second callback only guards against
      // a rejection nobody would handle (fatal on Deno and Node).
      running.then(release, (err) => {
        release();
        options.error(messageOf(err));
      });
    }
  } finally {
    while (inFlight > 0) await new Promise<void>((resolve) => wake = resolve);
    over = true;
    clearTimeout(linger);
    flush();
    await lastWrite; // a shutdown meanwhile may still hang up on a client that reads nothing
    clearInterval(stallCheck);
    options.stopSignal?.removeEventListener("abort", onStop);
  }
}
