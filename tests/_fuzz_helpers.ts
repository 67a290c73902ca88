/**
 * The protocol fuzzer shared by `fuzz_test.ts` (against nbdkit-ts) and
 * `fuzz_nbdkit.ts` (the same cases against nbdkit, for comparison).
 *
 * A case is a function of its seed: a client session (handshake flags,
 * options, requests) generated from a small PRNG, then, for most cases,
 * mutated at the byte level (bit flips, interesting values over length
 * fields, insertions, deletions, truncation), delivered in random pieces,
 * and ended in one of several ways (wait for the server, half-close, reset).
 * Unmutated cases are checked strictly: every option reply and every reply
 * to a request sent before NBD_CMD_DISC must arrive, once, well formed.
 *
 * Node built-ins only, so that Deno, Bun and Node run it alike.
 *
 * @module
 */
import { connect, type Socket } from "node:net";
import { readFileSync } from "node:fs";

// ---------------------------------------------------------------- the PRNG

/**
 * Marsaglia's xorshift32 with a scrambled seed: small, fast and the same on
 * every runtime, which is all a fuzzer needs from it.
 */
export class Rng {
  #state: number;

  /** A generator for `seed` (any integer; 0 is fine). */
  constructor(seed: number) {
    const s = Math.imul((seed >>> 0) ^ 0x9e3779b9, 0x85ebca6b) >>> 0;
    this.#state = s === 0 ? 0x6b43a9b5 : s;
    for (let i = 0; i < 4; i++) this.u32(); // let a poor seed spread
  }

  /** A uniform u32. */
  u32(): number {
    let x = this.#state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#state = x >>> 0;
    return this.#state;
  }

  /** An integer in [0, n) for n ≤ 2^32. */
  below(n: number): number {
    return n <= 1 ? 0 : Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  /** One element of `items`. */
  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)];
  }

  /** One key of a table of weights. */
  weighted<T>(table: readonly (readonly [T, number])[]): T {
    let total = 0;
    for (const [, w] of table) total += w;
    let at = this.below(total);
    for (const [v, w] of table) {
      if (at < w) return v;
      at -= w;
    }
    return table[0][0];
  }

  /** A u64. */
  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }

  /** `n` random bytes. */
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i += 4) {
      const v = this.u32();
      out[i] = v;
      if (i + 1 < n) out[i + 1] = v >>> 8;
      if (i + 2 < n) out[i + 2] = v >>> 16;
      if (i + 3 < n) out[i + 3] = v >>> 24;
    }
    return out;
  }
}

// ------------------------------------------------------------ wire values

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REP_MAGIC = 0x0003e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_MAGIC = 0x67446698;
const STRUCTURED_MAGIC = 0x668e33ef;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_STARTTLS = 5;
const OPT_INFO = 6;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_LIST_META_CONTEXT = 9;
const OPT_SET_META_CONTEXT = 10;

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_CACHE = 5;
const CMD_WRITE_ZEROES = 6;
const CMD_BLOCK_STATUS = 7;

/** The errnos a server may send (the spec's list). */
const KNOWN_ERRNOS = new Set([1, 5, 12, 22, 28, 75, 95, 108]);

/** The largest READ/WRITE a server must serve (nbdkit's and ours). */
const MAX_REQUEST = 64 * 1024 * 1024;

/** WRITE payloads larger than this are never sent whole (the generator's own cap). */
const MAX_SENT_PAYLOAD = 1024 * 1024;

class Bytes {
  #parts: Uint8Array[] = [];
  length = 0;
  push(b: Uint8Array): this {
    this.#parts.push(b);
    this.length += b.length;
    return this;
  }
  u16(n: number): this {
    return this.push(new Uint8Array([(n >>> 8) & 0xff, n & 0xff]));
  }
  u32(n: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, n >>> 0);
    return this.push(b);
  }
  u64(n: bigint): this {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt.asUintN(64, n));
    return this.push(b);
  }
  done(): Uint8Array {
    const out = new Uint8Array(this.length);
    let at = 0;
    for (const p of this.#parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
}

const utf8 = (s: string) => new TextEncoder().encode(s);

// -------------------------------------------------------------- the model

/** A request as the strict checker knows it. */
export interface ModelRequest {
  type: number;
  flags: number;
  cookie: bigint;
  offset: bigint;
  count: number;
}

/** What an unmutated case sent, for the strict checker. */
export interface Model {
  clientFlags: number;
  /** Options in order; the last one ends the handshake (GO, EXPORT_NAME, ABORT) or not. */
  options: number[];
  requests: ModelRequest[];
}

/** How the client ends the connection. */
export type Ending = "wait" | "half-close" | "reset" | "reset-early";

/** One generated case. */
export interface FuzzCase {
  seed: number;
  /** Everything the client sends. */
  bytes: Uint8Array;
  /** Offsets where the bytes are split into separate writes. */
  cuts: number[];
  /** Milliseconds between the pieces. */
  pauseMs: number;
  ending: Ending;
  /** Byte mutations applied (0: the case is checked strictly). */
  mutations: number;
  /** Set when unmutated. */
  model: Model | null;
}

/** What the generator needs to know about the target. */
export interface Target {
  /** The export's size in bytes. */
  size: number;
  /** Writes are refused (`-r`). */
  readonly: boolean;
  /** Requests reaching past this offset may fail (the chaos plugin's `failFrom=`). */
  failFrom?: number;
  /** The server may be shutting down: any request may get ESHUTDOWN. */
  stopping?: boolean;
}

const INTERESTING_U32 = [
  0,
  1,
  2,
  0x7f,
  0x80,
  0xff,
  0x100,
  0x1000,
  0xffff,
  0x10000,
  0x10001,
  MAX_REQUEST,
  MAX_REQUEST + 1,
  0x7fffffff,
  0x80000000,
  0xfffffffe,
  0xffffffff,
];

function nameBytes(r: Rng): Uint8Array {
  switch (r.below(6)) {
    case 0:
    case 1:
    case 2:
      return new Uint8Array(0);
    case 3:
      return utf8(r.pick(["foo", "default", "a/b", "é", "\u0000"]));
    case 4:
      return r.bytes(r.below(40)); // maybe not UTF-8
    default:
      return new Uint8Array(r.pick([4095, 4096, 4097])).fill(0x61);
  }
}

function infoPayload(r: Rng, valid: boolean): Uint8Array {
  const name = valid && r.chance(0.5) ? new Uint8Array(0) : nameBytes(r);
  const b = new Bytes().u32(name.length).push(name);
  const n = r.below(4);
  b.u16(valid ? n : r.chance(0.5) ? n + 1 : r.u32() & 0xffff);
  for (let i = 0; i < n; i++) b.u16(r.chance(0.8) ? r.below(4) : r.u32() & 0xffff);
  if (!valid && r.chance(0.3)) b.push(r.bytes(r.below(8)));
  return b.done();
}

function metaPayload(r: Rng): Uint8Array {
  const name = r.chance(0.7) ? new Uint8Array(0) : nameBytes(r);
  const queries = r.below(4);
  const b = new Bytes().u32(name.length).push(name);
  b.u32(r.chance(0.9) ? queries : r.u32());
  for (let i = 0; i < queries; i++) {
    const q = r.chance(0.6)
      ? utf8(r.pick(["base:allocation", "base:", "qemu:dirty-bitmap:x", "", "base:allocation2"]))
      : r.bytes(r.below(20));
    b.u32(r.chance(0.9) ? q.length : r.u32()).push(q);
  }
  if (r.chance(0.1)) b.push(r.bytes(r.below(6)));
  return b.done();
}

/** One option other than the final one: its code and payload. */
function genOption(r: Rng, strict: boolean): [number, Uint8Array] {
  const kind = r.weighted(
    [
      ["sr", 20],
      ["set-meta", 10],
      ["list-meta", 6],
      ["list", 8],
      ["info", 8],
      ["starttls", 3],
      ["unknown", 6],
      ["bad-go", strict ? 0 : 3],
      ["empty-payload-junk", 4],
    ] as const,
  );
  switch (kind) {
    case "sr":
      return [OPT_STRUCTURED_REPLY, new Uint8Array(0)];
    case "set-meta":
      return [OPT_SET_META_CONTEXT, metaPayload(r)];
    case "list-meta":
      return [OPT_LIST_META_CONTEXT, metaPayload(r)];
    case "list":
      return [OPT_LIST, new Uint8Array(0)];
    case "info":
      return [OPT_INFO, infoPayload(r, r.chance(0.7))];
    case "starttls":
      return [OPT_STARTTLS, new Uint8Array(0)];
    case "unknown":
      return [r.chance(0.5) ? 11 + r.below(20) : r.u32(), r.bytes(r.below(32))];
    case "bad-go":
      return [OPT_GO, infoPayload(r, false)];
    case "empty-payload-junk":
      // Options that must be empty, with a payload.
      return [r.pick([OPT_STRUCTURED_REPLY, OPT_LIST, OPT_STARTTLS]), r.bytes(1 + r.below(12))];
  }
}

function genOffset(r: Rng, size: number): bigint {
  const s = BigInt(size);
  switch (r.below(13)) {
    case 12:
      return s - 512n * BigInt(1 + r.below(256)); // aligned, near the end
    case 0:
      return 0n;
    case 1:
    case 2:
    case 3:
    case 4:
      return BigInt(r.below(size));
    case 5:
      return BigInt(r.below(size / 512)) * 512n;
    case 6:
      return s - BigInt(r.below(4097));
    case 7:
      return s + BigInt(r.below(3));
    case 8:
      return r.pick([2n ** 53n - 1n, 2n ** 53n, 2n ** 63n - 1n, 2n ** 63n, 2n ** 64n - 1n]);
    case 9:
      return 2n ** 64n - BigInt(r.below(4096) + 1);
    case 10:
      return BigInt(r.u32());
    default:
      return r.u64();
  }
}

function genCount(r: Rng, size: number): number {
  switch (r.below(11)) {
    case 0:
      return 0;
    case 1:
      return 1 + r.below(16);
    case 2:
    case 3:
    case 4:
      return 1 + r.below(8192);
    case 5:
      return 512 * (1 + r.below(128));
    case 6:
      return r.pick([65536, 65537, 1 << 20]);
    case 7:
      return r.pick([size, size + 1, size - 1]);
    case 8:
      return r.pick([MAX_REQUEST, MAX_REQUEST + 1]);
    case 9:
      return r.pick([0x7fffffff, 0x80000000, 0xffffffff]);
    default:
      return r.u32();
  }
}

function genFlags(r: Rng): number {
  if (r.chance(0.6)) return 0;
  if (r.chance(0.8)) return r.below(32); // the known flags, in any combination
  return r.u32() & 0xffff;
}

/**
 * Generate the case of `seed` for `target`.
 *
 * @param seed The case's seed.
 * @param target What the fuzzed server serves.
 * @returns The case.
 */
export function generate(seed: number, target: Target): FuzzCase {
  const r = new Rng(seed);
  const mutations = r.chance(0.3) ? 0 : 1 + r.below(4);
  const strict = mutations === 0;
  const out = new Bytes();
  const model: Model = { clientFlags: 0, options: [], requests: [] };

  // Handshake flags: mostly the usual FIXED_NEWSTYLE | NO_ZEROES.
  const clientFlags = r.weighted([[3, 85], [1, 6], [0, 3], [2, 2], [r.u32(), 4]] as const);
  model.clientFlags = clientFlags;
  out.u32(clientFlags);

  const option = (code: number, payload: Uint8Array, length = payload.length) => {
    out.u64(IHAVEOPT).u32(code).u32(length).push(payload);
    model.options.push(code);
  };
  if (r.chance(0.4)) {
    // What real clients do first, so that more cases reach BLOCK_STATUS.
    option(OPT_STRUCTURED_REPLY, new Uint8Array(0));
    const q = utf8("base:allocation");
    option(OPT_SET_META_CONTEXT, new Bytes().u32(0).u32(1).u32(q.length).push(q).done());
  }
  for (let i = r.below(5); i > 0; i--) option(...genOption(r, strict));
  if (!strict && r.chance(0.05)) {
    // A length the server must refuse without reading (or wait for, truncated).
    option(r.below(12), r.bytes(r.below(64)), r.pick(INTERESTING_U32));
  }

  const final = r.weighted([["go", 76], ["export-name", 18], ["abort", 3], ["none", 3]] as const);
  if (final === "go") option(OPT_GO, infoPayload(r, true));
  if (final === "export-name") {
    option(OPT_EXPORT_NAME, r.chance(0.8) ? new Uint8Array(0) : utf8("x"));
  }
  if (final === "abort") option(OPT_ABORT, new Uint8Array(0));

  // Requests: in a strict case every one is framed correctly.
  // Mostly a few requests; sometimes more than the server runs at once (16).
  const nRequests = r.chance(0.05) ? 20 + r.below(41) : r.below(13);
  for (let i = 0; i < nRequests; i++) {
    const type = r.weighted(
      [
        [CMD_READ, 25],
        [CMD_WRITE, 20],
        [CMD_FLUSH, 5],
        [CMD_TRIM, 6],
        [CMD_CACHE, 5],
        [CMD_WRITE_ZEROES, 8],
        [CMD_BLOCK_STATUS, 10],
        [CMD_DISC, 3],
        [8 + r.below(0xfff8), 4],
      ] as const,
    );
    const flags = genFlags(r);
    const cookie = BigInt(i + 1) | (BigInt(r.u32()) << 16n);
    const offset = genOffset(r, target.size);
    let count = genCount(r, target.size);
    if (type === CMD_WRITE && strict && count > MAX_SENT_PAYLOAD) count = r.below(65536);
    out.u32(REQUEST_MAGIC).u16(flags).u16(type).u64(cookie).u64(offset).u32(count);
    if (type === CMD_WRITE) {
      // Too big to send whole: send part of it; the case then ends early.
      const sent = count <= MAX_SENT_PAYLOAD ? count : r.below(65536);
      out.push(r.bytes(sent));
    }
    model.requests.push({ type, flags, cookie, offset, count });
    // A correct client sends nothing after DISC: the server closes, and the
    // client's next write fails (EPIPE), which makes Node-style sockets drop
    // replies not yet read. Mutated cases go on regardless.
    if (type === CMD_DISC && strict) break;
  }
  const sentDisc = model.requests.some((q) => q.type === CMD_DISC);
  if (r.chance(0.3) && !(strict && sentDisc)) {
    out.u32(REQUEST_MAGIC).u16(0).u16(CMD_DISC).u64(0n).u64(0n).u32(0);
  }

  let bytes = out.done();
  for (let i = 0; i < mutations; i++) bytes = mutate(r, bytes);

  const pieces = r.weighted([[1, 50], [2, 20], [3, 15], [8, 10], [64, 5]] as const);
  const cuts: number[] = [];
  for (let i = 1; i < pieces && bytes.length > 1; i++) cuts.push(1 + r.below(bytes.length - 1));
  cuts.sort((a, b) => a - b);
  return {
    seed,
    bytes,
    cuts,
    pauseMs: r.chance(0.7) ? 0 : 1 + r.below(3),
    ending: r.weighted(
      [["wait", 65], ["half-close", 15], ["reset", 12], ["reset-early", 8]] as const,
    ),
    mutations,
    model: strict ? model : null,
  };
}

function mutate(r: Rng, b: Uint8Array): Uint8Array {
  if (b.length === 0) return r.bytes(1 + r.below(32));
  const at = r.below(b.length);
  const out = b.slice();
  switch (r.below(8)) {
    case 0:
      out[at] ^= 1 << r.below(8);
      return out;
    case 1:
      out[at] = r.u32() & 0xff;
      return out;
    case 2:
      out[at] = r.pick([0, 1, 0x7f, 0x80, 0xff]);
      return out;
    case 3: {
      const ins = r.bytes(1 + r.below(16));
      return new Bytes().push(b.subarray(0, at)).push(ins).push(b.subarray(at)).done();
    }
    case 4:
      return new Bytes().push(b.subarray(0, at)).push(b.subarray(at + 1 + r.below(16))).done();
    case 5: {
      const from = r.below(b.length);
      const piece = b.subarray(from, from + 1 + r.below(64));
      return new Bytes().push(b.subarray(0, at)).push(piece).push(b.subarray(at)).done();
    }
    case 6:
      return b.subarray(0, at);
    default: {
      // An interesting value over what may be a length or count field.
      const pos = Math.min(at & ~3, Math.max(0, b.length - 4));
      if (b.length < 4) return out;
      new DataView(out.buffer).setUint32(pos, r.pick(INTERESTING_U32));
      return out;
    }
  }
}

// ------------------------------------------------------- the strict check

/** A reader over the server's bytes that says "not yet" rather than throwing. */
class Cursor {
  pos = 0;
  constructor(readonly b: Uint8Array, readonly view: DataView) {}
  has(n: number): boolean {
    return this.b.length - this.pos >= n;
  }
  u16(): number {
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number {
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }
  u64(): bigint {
    const v = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return v;
  }
}

/** The checker's verdict on what the server sent so far. */
export interface Verdict {
  /** Every reply the client was owed has arrived. */
  complete: boolean;
  /** The server entered transmission. */
  transmission: boolean;
  /** Replies received, by request index. */
  answered: number;
  /** Replies owed (requests before DISC), when in transmission. */
  owed: number;
}

/** A protocol violation by the server. */
export class Violation extends Error {}

/**
 * Check the server's bytes against an unmutated case's model. Incomplete
 * input is fine (the verdict says so); anything malformed throws
 * {@linkcode Violation}.
 *
 * @param model What the client sent.
 * @param got What the server sent so far.
 * @param target The target's properties, for requests that must succeed.
 */
export function check(model: Model, got: Uint8Array, target: Target): Verdict {
  const c = new Cursor(got, new DataView(got.buffer, got.byteOffset, got.byteLength));
  const verdict: Verdict = { complete: false, transmission: false, answered: 0, owed: 0 };
  if (!c.has(18)) return verdict;
  if (c.u64() !== NBDMAGIC || c.u64() !== IHAVEOPT) throw new Violation("bad greeting");
  const serverFlags = c.u16();
  if ((model.clientFlags & ~serverFlags) !== 0) {
    // The server must close: nothing else may follow.
    if (c.has(1)) throw new Violation("data after refusing the client flags");
    verdict.complete = true;
    return verdict;
  }
  const noZeroes = (model.clientFlags & 2) !== 0;
  let structured = false;
  let lastType = -1; // the final reply type of the last option
  for (const option of model.options) {
    if (option === OPT_EXPORT_NAME) {
      if (!c.has(10 + (noZeroes ? 0 : 124))) return verdict;
      const size = c.u64();
      c.u16();
      if (!noZeroes) c.pos += 124;
      if (size !== BigInt(target.size)) throw new Violation(`EXPORT_NAME: size ${size}`);
      verdict.transmission = true;
      break;
    }
    // Replies to this option until a final one.
    for (;;) {
      if (!c.has(20)) return verdict;
      if (c.u64() !== REP_MAGIC) throw new Violation(`bad option reply magic at ${c.pos - 8}`);
      const replyTo = c.u32();
      const type = c.u32();
      const length = c.u32();
      if (replyTo !== option) {
        throw new Violation(`reply to option ${replyTo} while ${option} was owed`);
      }
      if (length > 64 * 1024 * 1024) throw new Violation(`option reply length ${length}`);
      if (!c.has(length)) return verdict;
      c.pos += length;
      if (type === 1 || type >= 0x80000000) {
        if (type === 1 && option === OPT_STRUCTURED_REPLY) structured = true;
        lastType = type;
        break;
      }
      if (type < 2 || type > 4) throw new Violation(`unknown option reply type ${type}`);
    }
    if (option === OPT_ABORT || (option === OPT_GO && lastType === 1)) break;
  }
  const last = model.options[model.options.length - 1];
  if (last === OPT_GO && lastType === 1) verdict.transmission = true;
  if (!verdict.transmission) {
    // ABORT, a refused GO, or no final option: nothing more is owed.
    verdict.complete = true;
    return verdict;
  }

  // Transmission: one reply per request before DISC.
  const owed = new Map<bigint, ModelRequest>();
  for (const req of model.requests) {
    if (req.type === CMD_DISC) break;
    owed.set(req.cookie, req);
  }
  verdict.owed = owed.size;
  const answered = new Set<bigint>();
  const partialReads = new Map<bigint, number>(); // structured READ data received so far
  while (c.has(4)) {
    const start = c.pos;
    const magic = c.u32();
    if (magic === SIMPLE_MAGIC) {
      if (!c.has(12)) return verdict;
      const errno = c.u32();
      const cookie = c.u64();
      const req = owed.get(cookie);
      if (!req || answered.has(cookie)) throw new Violation(`simple reply to cookie ${cookie}`);
      if (structured && req.type === CMD_READ) {
        throw new Violation("simple reply to READ after structured replies");
      }
      if (req.type === CMD_BLOCK_STATUS && errno === 0) {
        throw new Violation("simple reply with success to BLOCK_STATUS");
      }
      checkErrno(req, errno, target);
      if (errno === 0 && req.type === CMD_READ) {
        if (!c.has(req.count)) {
          c.pos = start;
          return verdict;
        }
        c.pos += req.count;
      }
      answered.add(cookie);
    } else if (magic === STRUCTURED_MAGIC) {
      if (!structured) throw new Violation("structured reply without negotiation");
      if (!c.has(16)) return verdict;
      const flags = c.u16();
      const type = c.u16();
      const cookie = c.u64();
      const length = c.u32();
      const req = owed.get(cookie);
      if (!req || answered.has(cookie)) throw new Violation(`chunk for cookie ${cookie}`);
      if (!c.has(length)) return verdict;
      const body = new DataView(got.buffer, got.byteOffset + c.pos, length);
      c.pos += length;
      if (type === 1) { // OFFSET_DATA
        if (req.type !== CMD_READ || length < 8) throw new Violation("bad OFFSET_DATA chunk");
        const off = body.getBigUint64(0);
        if (off < req.offset || off + BigInt(length - 8) > req.offset + BigInt(req.count)) {
          throw new Violation("OFFSET_DATA outside the request");
        }
        partialReads.set(cookie, (partialReads.get(cookie) ?? 0) + length - 8);
      } else if (type === 2) { // OFFSET_HOLE
        if (req.type !== CMD_READ || length !== 12) throw new Violation("bad OFFSET_HOLE chunk");
        partialReads.set(cookie, (partialReads.get(cookie) ?? 0) + body.getUint32(8));
      } else if (type === 5) { // BLOCK_STATUS
        if (req.type !== CMD_BLOCK_STATUS || length < 12 || (length - 4) % 8 !== 0) {
          throw new Violation("bad BLOCK_STATUS chunk");
        }
        let total = 0;
        for (let at = 4; at < length; at += 8) total += body.getUint32(at);
        if ((req.flags & 8) !== 0 && length !== 12) throw new Violation("REQ_ONE ignored");
        if (total === 0 || total > req.count && length !== 12) {
          throw new Violation(`BLOCK_STATUS covers ${total} of ${req.count}`);
        }
      } else if (type === 0x8001 || type === 0x8002) { // ERROR, ERROR_OFFSET
        if (length < 6) throw new Violation("short error chunk");
        const errno = body.getUint32(0);
        if (errno === 0) throw new Violation("error chunk with errno 0");
        checkErrno(req, errno, target);
        if (6 + body.getUint16(4) > length) throw new Violation("error message overruns chunk");
      } else if (type !== 0) {
        throw new Violation(`unknown chunk type ${type}`);
      } else if ((flags & 1) === 0) {
        throw new Violation("NONE chunk without DONE");
      }
      if (flags & 1) {
        if (req.type === CMD_READ && type !== 0x8001 && type !== 0x8002) {
          const got = partialReads.get(cookie) ?? 0;
          if (got !== req.count) throw new Violation(`READ of ${req.count} got ${got} bytes`);
        }
        answered.add(cookie);
      }
    } else {
      throw new Violation(`bad reply magic 0x${magic.toString(16)} at ${start}`);
    }
    verdict.answered = answered.size;
  }
  verdict.answered = answered.size;
  verdict.complete = answered.size === owed.size && !c.has(1);
  return verdict;
}

/** A request valid by any reading of the spec must succeed. */
function checkErrno(req: ModelRequest, errno: number, target: Target): void {
  if (errno !== 0 && !KNOWN_ERRNOS.has(errno)) throw new Violation(`unknown errno ${errno}`);
  const plain = req.flags === 0 && req.count > 0 && req.count <= MAX_REQUEST &&
    req.offset + BigInt(req.count) <= BigInt(Math.min(target.size, target.failFrom ?? Infinity));
  const mustWork = plain &&
    (req.type === CMD_READ || (req.type === CMD_WRITE && !target.readonly));
  if (mustWork && errno !== 0 && !(errno === 108 && target.stopping)) {
    throw new Violation(`valid ${req.type === CMD_READ ? "READ" : "WRITE"} failed: ${errno}`);
  }
}

// ---------------------------------------------------------------- running

/** The outcome of running one case. */
export interface Outcome {
  /** Bytes the server sent. */
  received: number;
  /** The server closed the connection (rather than the client). */
  serverClosed: boolean;
  /** The strict verdict, for unmutated cases. */
  verdict: Verdict | null;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Run one case against the Unix socket `path`.
 *
 * @param path The server's socket.
 * @param fc The case.
 * @param target The target's properties.
 * @param idleMs How long a silent server is waited for before the client gives up.
 * @returns The outcome.
 * @throws {Violation} When an unmutated case gets a malformed or incomplete answer.
 */
export async function runCase(
  path: string,
  fc: FuzzCase,
  target: Target,
  idleMs = 40,
): Promise<Outcome> {
  const socket: Socket = await new Promise((resolve, reject) => {
    const s = connect({ path }, () => resolve(s));
    s.once("error", reject);
  });
  const chunks: Uint8Array[] = [];
  let received = 0;
  let closed = false;
  let lastData = Date.now();
  let wake: (() => void) | null = null;
  const poke = () => {
    const w = wake;
    wake = null;
    w?.();
  };
  socket.on("data", (d: Uint8Array) => {
    // Strict cases keep everything for the checker; the others only count.
    if (fc.model) chunks.push(new Uint8Array(d));
    received += d.length;
    lastData = Date.now();
    poke();
  });
  let how = "the server closed";
  socket.on("error", (err: Error & { code?: string }) => how = `error ${err.code ?? err.message}`);
  socket.on("close", () => {
    closed = true;
    poke();
  });

  let at = 0;
  for (const cut of [...fc.cuts, fc.bytes.length]) {
    if (closed) break;
    if (cut > at) socket.write(fc.bytes.subarray(at, cut));
    at = cut;
    if (fc.pauseMs > 0) await sleep(fc.pauseMs);
    if (fc.ending === "reset-early") break; // after the first piece
  }
  if (fc.ending === "reset" || fc.ending === "reset-early") {
    socket.destroy();
    return { received, serverClosed: false, verdict: null };
  }
  if (fc.ending === "half-close") socket.end();

  const all = () => {
    const out = new Uint8Array(received);
    let p = 0;
    for (const ch of chunks) {
      out.set(ch, p);
      p += ch.length;
    }
    return out;
  };
  // Strict cases wait until everything owed has come (or the server closed);
  // the others until the server closes or falls silent.
  const deadline = Date.now() + (fc.model ? 10_000 : 2_000);
  let verdict: Verdict | null = null;
  try {
    while (!closed && Date.now() < deadline) {
      if (fc.model) {
        verdict = check(fc.model, all(), target);
        if (verdict.complete) break;
      } else if (Date.now() - lastData >= idleMs) {
        break;
      }
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, fc.model ? 50 : idleMs);
      });
    }
    if (fc.model) {
      verdict = check(fc.model, all(), target);
      if (verdict.transmission && !verdict.complete) {
        throw new Violation(
          `${verdict.answered} of ${verdict.owed} replies after ${closed ? how : "10 s"}`,
        );
      }
    }
  } finally {
    socket.destroy();
  }
  return { received, serverClosed: closed, verdict };
}

/**
 * Resident memory of a process in KiB, from `/proc/PID/status`.
 *
 * @param pid The process.
 * @returns VmRSS, or -1 when the process is gone.
 */
export function rssKiB(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : -1;
  } catch {
    return -1;
  }
}

/** Whether a process exists and is not a zombie. */
export function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

/**
 * Run `count` cases from `firstSeed` with `parallel` at a time, calling
 * `between` after every `every` cases once the running ones have finished.
 *
 * @returns The seeds of failed cases with their errors.
 */
export async function runMany(
  path: string,
  target: Target,
  seeds: number[],
  options: {
    parallel: number;
    every: number;
    between: (done: number) => Promise<void>;
    stop?: () => boolean;
  },
): Promise<{ seed: number; error: string }[]> {
  const failures: { seed: number; error: string }[] = [];
  let gone = false;
  for (let start = 0; start < seeds.length && !gone; start += options.every) {
    const batch = seeds.slice(start, start + options.every);
    let next = 0;
    const worker = async () => {
      while (next < batch.length && !options.stop?.() && !gone) {
        const seed = batch[next++];
        try {
          await runCase(path, generate(seed, target), target);
        } catch (err) {
          failures.push({ seed, error: err instanceof Error ? err.message : String(err) });
          // No server to connect to: it died, and every further case would fail
          // at once (on Bun, in a loop that starves the timers).
          const code = (err as { code?: string }).code;
          if (code === "ENOENT" || code === "ECONNREFUSED") gone = true;
          await sleep(1);
        }
      }
    };
    await Promise.all(Array.from({ length: options.parallel }, worker));
    await options.between(start + batch.length);
    if (options.stop?.()) break;
  }
  return failures;
}

// ------------------------------------------------------- the chaos plugin

/**
 * A plugin module (plain JavaScript, so that every runtime and the npm
 * build load it) for fuzzing the server's side of the plugin contract: a
 * RAM disk whose calls finish after random short delays (so replies go out
 * of order), which throws every kind of value for requests that reach
 * `failFrom=` and beyond (and reports nonsense extents there), and which
 * counts `open` and `close` in `stats=FILE` so that a test can check that
 * every handle is closed.
 */
export const CHAOS_PLUGIN = `import { writeFileSync } from "node:fs";
let size = 4 * 1024 * 1024;
let failFrom = Infinity;
let stats = null;
let disk = null;
let opens = 0;
let closes = 0;
let calls = 0;
const record = () => stats && writeFileSync(stats, opens + " " + closes + "\\n");
const jitter = () => (++calls % 3 === 0 ? new Promise((r) => setTimeout(r, calls % 4)) : null);
const weird = [
  () => "a string",
  () => undefined,
  () => null,
  () => 42,
  () => ({ message: { nested: true } }),
  () => Object.create(null),
  () => new Proxy({}, { get() { throw new Error("trap"); }, getPrototypeOf() { throw new Error("trap"); } }),
  () => Symbol("thrown"),
  () => Object.assign(new Error("quota"), { name: "NbdError", errno: "ENOSPC" }),
  () => Object.assign(new Error("odd errno"), { name: "NbdError", errno: "constructor" }),
  () => new RangeError("line one\\nline two"),
];
async function check(offset, count) {
  const j = jitter();
  if (j) await j;
  if (offset + count > failFrom) {
    const value = weird[Math.floor(offset / 512) % weird.length]();
    if (offset % 1024 === 0) throw value;
    return Promise.reject(value);
  }
}
export default {
  name: "chaos",
  config(key, value) {
    if (key === "size") size = Number(value);
    else if (key === "failFrom") failFrom = Number(value);
    else if (key === "stats") stats = value;
    else throw new Error("unknown parameter '" + key + "'");
  },
  configComplete() {
    disk = new Uint8Array(size);
    record();
  },
  open() {
    opens++;
    record();
    return {};
  },
  close() {
    closes++;
    record();
  },
  getSize: () => size,
  canFua: () => "native",
  canMultiConn: () => true,
  canCache: () => "native",
  async pread(_h, buf, offset) {
    await check(offset, buf.length);
    buf.set(disk.subarray(offset, offset + buf.length));
  },
  async pwrite(_h, buf, offset) {
    await check(offset, buf.length);
    disk.set(buf, offset);
  },
  async flush() {
    await jitter();
  },
  async trim(_h, count, offset) {
    await check(offset, count);
  },
  async zero(_h, count, offset) {
    await check(offset, count);
    disk.fill(0, offset, offset + count);
  },
  async cache(_h, count, offset) {
    await check(offset, count);
  },
  async extents(_h, count, offset, _flags, sink) {
    if (offset + count > failFrom) {
      if (offset % 1024 === 0) {
        // Nonsense a plugin in JavaScript could send: the server must refuse it
        // (EIO), not put a zero or garbage length on the wire.
        sink.add(offset, Number.NaN, 0);
        sink.add(String(offset), "4096", 0);
        return;
      }
      throw weird[Math.floor(offset / 512) % weird.length]();
    }
    await jitter();
    for (let at = offset; at < offset + count; ) {
      const next = Math.min(offset + count, (Math.floor(at / 65536) + 1) * 65536);
      sink.add(at, next - at, Math.floor(at / 65536) % 2 ? 3 : 0);
      at = next;
    }
  },
};
`;

/**
 * A fingerprint of the generator's output (FNV-1a over the bytes of a few
 * cases). Regression seeds name cases by seed: any change to the generator
 * changes the cases they name, and this fingerprint with them.
 *
 * @returns The fingerprint, as hex.
 */
export function generatorFingerprint(): string {
  let h = 0x811c9dc5;
  const target: Target = { size: 4 << 20, readonly: false, failFrom: (4 << 20) - 65536 };
  for (const seed of [1, 2, 3, 4, 5, 6, 7, 8, 1000078, 1006602, 1007626]) {
    const fc = generate(seed, target);
    for (const b of fc.bytes) h = Math.imul(h ^ b, 0x01000193) >>> 0;
    for (const c of fc.cuts) h = Math.imul(h ^ c, 0x01000193) >>> 0;
    h = Math.imul(h ^ fc.ending.length ^ fc.pauseMs, 0x01000193) >>> 0;
  }
  return h.toString(16);
}

/**
 * A client that negotiates (GO, simple replies) and then sends READs of
 * `count` bytes for `ms` milliseconds without ever reading a reply. Resolves
 * with the number of requests sent; the socket is left open for the caller
 * to destroy.
 */
export async function floodWithoutReading(
  path: string,
  count: number,
  ms: number,
): Promise<{ sent: number; socket: Socket }> {
  const socket: Socket = await new Promise((resolve, reject) => {
    const s = connect({ path }, () => resolve(s));
    s.once("error", reject);
  });
  socket.on("error", () => {});
  socket.pause(); // never read
  const hello = new Bytes().u32(3).u64(IHAVEOPT).u32(OPT_GO).u32(6).u32(0).u16(0).done();
  socket.write(hello);
  const burst = new Bytes();
  for (let i = 0; i < 1000; i++) {
    burst.u32(REQUEST_MAGIC).u16(0).u16(CMD_READ).u64(BigInt(i)).u64(BigInt(i % 16) * 4096n)
      .u32(count);
  }
  const bytes = burst.done();
  let sent = 0;
  const end = Date.now() + ms;
  while (Date.now() < end && !socket.destroyed) {
    if (socket.writableLength > (16 << 20)) {
      // The server stopped reading (as it should): the requests pile up here.
      await sleep(50);
      continue;
    }
    socket.write(bytes);
    sent += 1000;
    await sleep(0);
  }
  return { sent, socket };
}
