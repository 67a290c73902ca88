/**
 * The fixed newstyle handshake: greeting, client flags, option haggling,
 * until the client chooses an export (GO or EXPORT_NAME) or leaves.
 *
 * @module
 */
import type { ByteReader } from "./byte_reader.ts";
import {
  BASE_ALLOCATION,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_DF,
  NBD_IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_MAX_STRING,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "./constants.ts";
import { optionName, replyName } from "./names.ts";
import type { ExportProvider, ExportSession } from "./session.ts";
import type { ExportInfo } from "../plugins/plugin.ts";
import { concat, optionReply, ProtocolError, u16, u32, u64, utf8 } from "./wire.ts";
import { messageOf } from "../plugins/errors.ts";

/** The id of `base:allocation` when selected. */
export const BASE_ALLOCATION_ID = 1;

/** The largest option payload read; longer ones are skipped and refused. */
export const MAX_OPTION_LENGTH = 64 * 1024;
/** Beyond this (nbdkit's limit too) an option is not even skipped: the connection ends. */
export const MAX_OPTION_SKIP = 64 * 1024 * 1024;
/** The options this server knows: too long, they get NBD_REP_ERR_TOO_BIG, others NBD_REP_ERR_UNSUP. */
const KNOWN_OPTIONS = new Set([
  NBD_OPT_ABORT,
  NBD_OPT_LIST,
  NBD_OPT_STARTTLS,
  NBD_OPT_INFO,
  NBD_OPT_GO,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
]);
/** Options accepted per handshake before the server gives up on the client. */
export const MAX_OPTIONS = 1024;

/** How a connection is upgraded to TLS, when the server offers it. */
export interface TlsUpgrade {
  /** `require`: nothing but STARTTLS and ABORT before TLS. */
  required: boolean;
  /**
   * Replace the transport with a TLS one over it. The reader must have no
   * leftover bytes; the returned reader and writer replace the old ones.
   */
  start(
    reader: ByteReader,
    writer: WritableStreamDefaultWriter<Uint8Array>,
  ): Promise<{ reader: ByteReader; writer: WritableStreamDefaultWriter<Uint8Array> }>;
}

/** Server policy for the handshake. */
export interface HandshakeOptions {
  /** Offer structured replies (false with `--no-sr`). */
  structuredReplies: boolean;
  /** Offer metadata contexts (false with `--no-mc`). */
  metaContexts: boolean;
  /** Global handshake flags to advertise (masked by `--mask-handshake`). */
  handshakeFlags: number;
  /** TLS, when enabled. */
  tls?: TlsUpgrade;
  /** A one-line diagnostic (debug level). */
  debug(message: string): void;
  /** A one-line error (an export that cannot be opened). */
  error(message: string): void;
}

/** What the handshake settled. */
export interface Negotiated {
  /** The opened export. */
  session: ExportSession;
  /** Structured replies were negotiated. */
  structured: boolean;
  /** `base:allocation` was selected for this export. */
  baseAllocation: boolean;
  /** The transport in use from now on (replaced by TLS). */
  reader: ByteReader;
  /** The transport in use from now on. */
  writer: WritableStreamDefaultWriter<Uint8Array>;
  /** Whether TLS is active. */
  tls: boolean;
}

/** A cursor over an option's payload, with bound checks. */
class Payload {
  #view: DataView;
  #bytes: Uint8Array;
  pos = 0;
  constructor(bytes: Uint8Array) {
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  get left(): number {
    return this.#bytes.length - this.pos;
  }
  u16(): number | null {
    if (this.left < 2) return null;
    const v = this.#view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number | null {
    if (this.left < 4) return null;
    const v = this.#view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }
  bytes(n: number): Uint8Array | null {
    if (this.left < n) return null;
    const v = this.#bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
}

const decoder = new TextDecoder("utf-8", { fatal: true });

function decode(bytes: Uint8Array): string | null {
  try {
    return decoder.decode(bytes);
  } catch {
    return null;
  }
}

/** A bad option: answered with `NBD_REP_ERR_INVALID` and a debug message. */
class InvalidOption extends Error {}

/**
 * Check a string the client sent as nbdkit does (at most 4096 bytes, no NUL,
 * which C servers and plugins would cut the string at) and decode it: a name
 * that is not UTF-8 could not be matched or logged faithfully.
 */
function clientString(bytes: Uint8Array, what: string): string {
  if (bytes.length > NBD_MAX_STRING) {
    throw new InvalidOption(`${what} too long (${bytes.length} bytes > ${NBD_MAX_STRING})`);
  }
  if (bytes.includes(0)) throw new InvalidOption(`${what} may not include NUL bytes`);
  const s = decode(bytes);
  if (s === null) throw new InvalidOption(`${what} is not UTF-8`);
  return s;
}

/** Parse a `u32 length, string` field of INFO/GO/META_CONTEXT payloads. */
function readString(p: Payload, what: string): string {
  const len = p.u32();
  if (len === null || len > p.left) throw new InvalidOption(`${what}: truncated`);
  return clientString(p.bytes(len)!, what);
}

/**
 * Run the handshake on a fresh connection.
 *
 * @param reader The client's bytes.
 * @param writer Where the server's bytes go.
 * @param provider The exports.
 * @param options The server's policy.
 * @returns The negotiated export, or null when the client left cleanly.
 * @throws {ProtocolError} When the client breaks the protocol.
 */
export async function handshake(
  reader: ByteReader,
  writer: WritableStreamDefaultWriter<Uint8Array>,
  provider: ExportProvider,
  options: HandshakeOptions,
): Promise<Negotiated | null> {
  const greeting = new Uint8Array(18);
  const gv = new DataView(greeting.buffer);
  gv.setBigUint64(0, NBD_MAGIC);
  gv.setBigUint64(8, NBD_IHAVEOPT);
  const globalFlags = options.handshakeFlags & (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
  gv.setUint16(16, globalFlags);
  await writer.write(greeting);
  options.debug(`newstyle negotiation: flags: global 0x${globalFlags.toString(16)}`);

  const cflagsBytes = await reader.read(4);
  const cflags = new DataView(cflagsBytes.buffer, cflagsBytes.byteOffset, 4).getUint32(0);
  const known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
  if ((cflags & ~known) !== 0) {
    throw new ProtocolError(`client sent unknown handshake flags 0x${cflags.toString(16)}`);
  }
  if ((cflags & ~globalFlags) !== 0) {
    throw new ProtocolError(`client sent handshake flags 0x${cflags.toString(16)} not offered`);
  }
  const noZeroes = (cflags & NBD_FLAG_C_NO_ZEROES) !== 0;
  const fixed = (cflags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
  options.debug(`newstyle negotiation: client flags: 0x${cflags.toString(16)}`);

  let structured = false;
  let metaExport: string | null = null; // export name base:allocation was set for
  let tls = false;

  const reply = (option: number, type: number, data?: Uint8Array) => {
    // As nbdkit's -v: the replies that end an option (the lists' entries are not).
    if (type === NBD_REP_ACK || type >= NBD_REP_ERR_UNSUP) {
      options.debug(`replying to ${optionName(option)} with ${replyName(type)}`);
    }
    return writer.write(optionReply(option, type, data));
  };
  /**
   * The refusal an option gets whatever it holds, or null: without fixed
   * newstyle only EXPORT_NAME exists (nbdkit answers the rest so), and before
   * a required TLS only STARTTLS and ABORT are allowed.
   */
  const gate = (option: number): number | null => {
    if (!fixed && option !== NBD_OPT_EXPORT_NAME) return NBD_REP_ERR_INVALID;
    if (options.tls?.required && !tls && option !== NBD_OPT_STARTTLS && option !== NBD_OPT_ABORT) {
      return NBD_REP_ERR_TLS_REQD;
    }
    return null;
  };
  /** The export flags, as `-v` shows them. */
  const exportFlags = (flags: number) =>
    options.debug(`newstyle negotiation: flags: export 0x${flags.toString(16)}`);

  for (let count = 0;; count++) {
    if (count >= MAX_OPTIONS) {
      throw new ProtocolError(`client sent more than ${MAX_OPTIONS} options`);
    }
    const head = await reader.read(16);
    const hv = new DataView(head.buffer, head.byteOffset, 16);
    if (hv.getBigUint64(0) !== NBD_IHAVEOPT) {
      throw new ProtocolError("client sent an option without the IHAVEOPT magic");
    }
    const option = hv.getUint32(8);
    const length = hv.getUint32(12);
    const name = optionName(option);
    if (length > MAX_OPTION_LENGTH) {
      const tooLong = `client option ${name} too long: ${length} bytes > ${MAX_OPTION_LENGTH}`;
      // EXPORT_NAME has no error reply; past nbdkit's own limit, not worth the bandwidth.
      if (length > MAX_OPTION_SKIP || option === NBD_OPT_EXPORT_NAME) {
        throw new ProtocolError(tooLong);
      }
      // The length is there so that a server can step over what it will not
      // read: the client gets an answer and may go on, as with nbdkit.
      await reader.skip(length);
      options.debug(tooLong);
      await reply(
        option,
        gate(option) ?? (KNOWN_OPTIONS.has(option) ? NBD_REP_ERR_TOO_BIG : NBD_REP_ERR_UNSUP),
      );
      continue;
    }
    const data = length > 0 ? await reader.read(length) : new Uint8Array(0);
    options.debug(`newstyle negotiation: ${name}${length > 0 ? ` (${length} bytes)` : ""}`);

    const refused = gate(option);
    if (refused !== null) {
      // gate() lets EXPORT_NAME through but for a required TLS, and it has no error reply.
      if (option === NBD_OPT_EXPORT_NAME) {
        throw new ProtocolError("client sent NBD_OPT_EXPORT_NAME before TLS, which is required");
      }
      if (refused === NBD_REP_ERR_INVALID) {
        options.debug(`${name}: the client did not ask for fixed newstyle`);
      }
      await reply(option, refused);
      continue;
    }

    try {
      switch (option) {
        case NBD_OPT_EXPORT_NAME: {
          let exportName: string;
          try {
            exportName = clientString(data, `${name}: export name`);
          } catch (err) {
            // EXPORT_NAME has no error reply: closing is the answer.
            throw new ProtocolError(messageOf(err));
          }
          options.debug(`newstyle negotiation: ${name}: client requested export '${exportName}'`);
          let session: ExportSession;
          try {
            session = await provider.open(exportName, tls);
          } catch (err) {
            // EXPORT_NAME has no error reply: closing is the answer.
            throw new ProtocolError(`cannot open export "${exportName}": ${messageOf(err)}`);
          }
          const flags = session.flags | (structured ? NBD_FLAG_SEND_DF : 0);
          exportFlags(flags);
          try {
            await writer.write(
              concat(
                u64(session.size),
                u16(flags),
                noZeroes ? new Uint8Array(0) : new Uint8Array(124),
              ),
            );
          } catch (err) {
            // The client left (or timed out) before the reply: nobody else
            // will close the plugin's handle.
            await session.close().catch(() => {});
            throw err;
          }
          return {
            session,
            structured,
            baseAllocation: metaExport === exportName,
            reader,
            writer,
            tls,
          };
        }

        case NBD_OPT_ABORT:
          await reply(option, NBD_REP_ACK).catch(() => {});
          return null;

        case NBD_OPT_LIST: {
          if (length !== 0) throw new InvalidOption("NBD_OPT_LIST: payload must be empty");
          let exports: ExportInfo[];
          try {
            exports = await provider.listExports(tls);
          } catch (err) {
            // As nbdkit: the list could not be made here (a directory gone, say).
            options.error(`NBD_OPT_LIST: cannot list exports: ${messageOf(err)}`);
            await reply(
              option,
              NBD_REP_ERR_PLATFORM,
              utf8(messageOf(err).slice(0, NBD_MAX_STRING)),
            );
            break;
          }
          for (const exp of exports) {
            const nameBytes = utf8(exp.name);
            await reply(
              option,
              NBD_REP_SERVER,
              concat(u32(nameBytes.length), nameBytes, utf8(exp.description ?? "")),
            );
          }
          await reply(option, NBD_REP_ACK);
          break;
        }

        case NBD_OPT_STARTTLS: {
          if (length !== 0) throw new InvalidOption("NBD_OPT_STARTTLS: payload must be empty");
          if (!options.tls) {
            await reply(option, NBD_REP_ERR_POLICY);
            break;
          }
          if (tls) throw new InvalidOption("NBD_OPT_STARTTLS: TLS is already active");
          if (reader.buffered > 0) {
            throw new ProtocolError("client sent data after NBD_OPT_STARTTLS before the reply");
          }
          await reply(option, NBD_REP_ACK);
          ({ reader, writer } = await options.tls.start(reader, writer));
          tls = true;
          // Everything negotiated in clear is forgotten (the spec requires it).
          structured = false;
          metaExport = null;
          break;
        }

        case NBD_OPT_INFO:
        case NBD_OPT_GO: {
          const p = new Payload(data);
          const exportName = readString(p, `${name}: export name`);
          const nInfos = p.u16();
          if (nInfos === null || p.left !== nInfos * 2) {
            throw new InvalidOption(`${name}: information request list has the wrong length`);
          }
          const wanted = new Set<number>();
          for (let i = 0; i < nInfos; i++) wanted.add(p.u16()!);
          options.debug(`newstyle negotiation: ${name}: client requested export '${exportName}'`);
          let session: ExportSession;
          try {
            session = await provider.open(exportName, tls);
          } catch (err) {
            options.error(`${name}: cannot open export "${exportName}": ${messageOf(err)}`);
            await reply(option, NBD_REP_ERR_UNKNOWN, utf8(messageOf(err).slice(0, NBD_MAX_STRING)));
            break;
          }
          try {
            const flags = session.flags | (structured ? NBD_FLAG_SEND_DF : 0);
            exportFlags(flags);
            await reply(
              option,
              NBD_REP_INFO,
              concat(u16(NBD_INFO_EXPORT), u64(session.size), u16(flags)),
            );
            if (wanted.has(NBD_INFO_NAME)) {
              await reply(option, NBD_REP_INFO, concat(u16(NBD_INFO_NAME), utf8(session.name)));
            }
            if (wanted.has(NBD_INFO_DESCRIPTION) && session.description) {
              await reply(
                option,
                NBD_REP_INFO,
                concat(u16(NBD_INFO_DESCRIPTION), utf8(session.description)),
              );
            }
            const b = session.blockSize;
            // Sent only when the plugin states sizes, as nbdkit does; the spec lets a
            // server send it unasked, and clients then honour it.
            if (b) {
              await reply(
                option,
                NBD_REP_INFO,
                concat(u16(NBD_INFO_BLOCK_SIZE), u32(b.minimum), u32(b.preferred), u32(b.maximum)),
              );
            }
            await reply(option, NBD_REP_ACK);
          } catch (err) {
            await session.close();
            throw err;
          }
          if (option === NBD_OPT_INFO) {
            await session.close();
            break;
          }
          const baseAllocation = metaExport !== null &&
            (metaExport === exportName || metaExport === session.name);
          return { session, structured, baseAllocation, reader, writer, tls };
        }

        case NBD_OPT_STRUCTURED_REPLY:
          if (!options.structuredReplies) {
            await reply(option, NBD_REP_ERR_UNSUP);
            break;
          }
          if (length !== 0) {
            throw new InvalidOption("NBD_OPT_STRUCTURED_REPLY: payload must be empty");
          }
          structured = true;
          options.debug(`newstyle negotiation: ${name}: client requested structured replies`);
          await reply(option, NBD_REP_ACK);
          break;

        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT: {
          if (!options.metaContexts) {
            await reply(option, NBD_REP_ERR_UNSUP);
            break;
          }
          // The spec: SET replaces the contexts set before, even when it fails.
          if (option === NBD_OPT_SET_META_CONTEXT) metaExport = null;
          if (!structured) {
            throw new InvalidOption(`${name}: structured replies must be negotiated first`);
          }
          const p = new Payload(data);
          const exportName = readString(p, `${name}: export name`);
          const nQueries = p.u32();
          if (nQueries === null) throw new InvalidOption(`${name}: truncated query count`);
          const queries: string[] = [];
          for (let i = 0; i < nQueries; i++) {
            queries.push(readString(p, `${name}: query`));
          }
          if (p.left !== 0) throw new InvalidOption(`${name}: trailing bytes`);
          options.debug(
            `newstyle negotiation: ${name}: client requested export '${exportName}', ` +
              `queries: ${queries.length === 0 ? "none" : queries.join(", ")}`,
          );
          const list = option === NBD_OPT_LIST_META_CONTEXT;
          const matches = list && nQueries === 0
            ? true
            : queries.some((q) => q === BASE_ALLOCATION || (list && q === "base:"));
          if (!list && matches) metaExport = exportName;
          if (matches) {
            options.debug(`newstyle negotiation: ${name}: replying with ${BASE_ALLOCATION}`);
            await reply(
              option,
              NBD_REP_META_CONTEXT,
              concat(u32(list ? 0 : BASE_ALLOCATION_ID), utf8(BASE_ALLOCATION)),
            );
          }
          await reply(option, NBD_REP_ACK);
          break;
        }

        default:
          await reply(option, NBD_REP_ERR_UNSUP);
      }
    } catch (err) {
      if (!(err instanceof InvalidOption)) throw err;
      options.debug(err.message);
      await reply(option, NBD_REP_ERR_INVALID);
    }
  }
}
