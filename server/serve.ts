/**
 * The server: listens, runs the handshake and the transmission phase for
 * each connection against a plugin, and shuts down cleanly.
 *
 * @module
 */
import { ByteReader, EndOfStream } from "../protocol/byte_reader.ts";
import { NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES } from "../protocol/constants.ts";
import { handshake, type TlsUpgrade } from "../protocol/handshake.ts";
import type { ExportSession } from "../protocol/session.ts";
import { transmission } from "../protocol/transmission.ts";
import { ProtocolError } from "../protocol/wire.ts";
import { messageOf } from "../plugins/errors.ts";
import type { Plugin } from "../plugins/plugin.ts";
import { runtime } from "../runtime/mod.ts";
import type { Connection, ListenAddress, Listener } from "../runtime/types.ts";
import { pluginProvider } from "./backend.ts";
import { Logger } from "./log.ts";
import { Mutex } from "./mutex.ts";

/** Where and how to serve. */
export interface ServeOptions {
  /** Listen on this Unix socket path. */
  unixSocket?: string;
  /** Listen on this TCP port (10809 when neither this nor `unixSocket` is given; 0 picks one). */
  port?: number;
  /** The TCP address to bind (all addresses when absent). */
  hostname?: string;
  /** Serve exactly one connection on stdin/stdout (`-s`). */
  stdio?: boolean;
  /** `-r`: read-only for every client. */
  readonly?: boolean;
  /** `-e`: the default export's name. */
  exportName?: string;
  /** `-t`: requests in flight per connection (16). */
  threads?: number;
  /** Offer structured replies (true; `--no-sr` sets false). */
  structuredReplies?: boolean;
  /** Offer metadata contexts (true; `--no-mc` sets false). */
  metaContexts?: boolean;
  /** `--mask-handshake`: global flags to advertise (all). */
  maskHandshake?: number;
  /** Seconds a client may take to finish the handshake (60). */
  handshakeTimeout?: number;
  /** TLS, from `server/tls.ts`. */
  tls?: TlsUpgrade;
}

/** A running server. */
export interface Server {
  /** Where it listens (null with `stdio`). */
  readonly address: ListenAddress | null;
  /** Connections currently open. */
  readonly connections: number;
  /** Resolves when the server has stopped (after `close()`, or after the `-s` connection). */
  readonly finished: Promise<void>;
  /**
   * Stop: no new connections, requests already received finish, later ones
   * get ESHUTDOWN, connections close, then the plugin is unloaded.
   */
  close(): Promise<void>;
}

/** The default NBD port. */
export const NBD_DEFAULT_PORT = 10809;

/** `serialize_connections`: one connection at a time, server wide. */
const connectionLock = new Mutex();

/**
 * Serve a plugin that is already configured (`config`, `configComplete`
 * done). Calls `getReady`, listens, and returns once listening.
 *
 * @param plugin The plugin.
 * @param options Where and how.
 * @returns The running server.
 *
 * @example Serve a RAM disk on a Unix socket
 * ```ts ignore
 * import { serve } from "../mod.ts";
 * import memory from "../plugins/memory.ts";
 * await memory.config!("size", "1G");
 * const server = await serve(memory, { unixSocket: "/tmp/nbd.sock" });
 * // … nbdinfo nbd+unix:///?socket=/tmp/nbd.sock
 * await server.close();
 * ```
 */
export async function startServer<H>(
  plugin: Plugin<H>,
  options: ServeOptions = {},
): Promise<Server> {
  await plugin.getReady?.();
  const log = new Logger();
  const active = new Set<{ conn: Connection; reader: ByteReader; done: Promise<void> }>();
  let shuttingDown = false;
  let counter = 0;
  let listener: Listener | null = null;
  let resolveFinished!: () => void;
  const finished = new Promise<void>((r) => resolveFinished = r);

  const backendOptions = {
    readonly: options.readonly ?? false,
    exportName: options.exportName ?? "",
  };
  const handshakeFlags = (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES) &
    (options.maskHandshake ?? 0xffff);

  const handle = async (conn: Connection, reader: ByteReader): Promise<void> => {
    const id = ++counter;
    const clog = new Logger(`${plugin.name}[${id}]`);
    const release = plugin.threadModel === "serialize_connections"
      ? await connectionLock.acquire()
      : null;
    let session: ExportSession | null = null;
    let writer: WritableStreamDefaultWriter<Uint8Array> | null = null;
    const timeoutMs = (options.handshakeTimeout ?? 60) * 1000;
    const timer = timeoutMs > 0
      ? setTimeout(() => {
        clog.error(`client did not finish the handshake within ${timeoutMs / 1000} seconds`);
        conn.close();
      }, timeoutMs)
      : undefined;
    try {
      writer = conn.writable.getWriter();
      const negotiated = await handshake(
        reader,
        writer,
        pluginProvider(plugin, backendOptions, id),
        {
          structuredReplies: options.structuredReplies ?? true,
          metaContexts: options.metaContexts ?? true,
          handshakeFlags,
          tls: options.tls,
          debug: (m) => clog.debug(m),
          error: (m) => clog.error(m),
        },
      );
      clearTimeout(timer);
      if (!negotiated) return;
      session = negotiated.session;
      writer = negotiated.writer;
      await transmission(negotiated.reader, negotiated.writer, session, {
        structured: negotiated.structured,
        baseAllocation: negotiated.baseAllocation,
        maxInFlight: plugin.threadModel === "serialize_requests" ? 1 : options.threads ?? 16,
        error: (m) => clog.error(m),
        debug: (m) => clog.debug(m),
        shuttingDown: () => shuttingDown,
      });
    } catch (err) {
      if (err instanceof EndOfStream) clog.debug(`client closed the connection: ${err.message}`);
      else if (err instanceof ProtocolError) clog.error(err.message);
      else clog.error(messageOf(err));
    } finally {
      clearTimeout(timer);
      if (session) {
        try {
          await session.close();
        } catch (err) {
          clog.error(`close: ${messageOf(err)}`);
        }
      }
      try {
        await writer?.close();
      } catch {
        // the peer is gone
      }
      conn.close();
      release?.();
    }
  };

  const accept = (conn: Connection) => {
    if (shuttingDown) {
      conn.close();
      return;
    }
    const reader = new ByteReader(conn.readable);
    const entry = { conn, reader, done: Promise.resolve() };
    entry.done = handle(conn, reader).finally(() => active.delete(entry));
    active.add(entry);
  };

  if (options.stdio) {
    accept(runtime.stdio());
  } else if (options.unixSocket !== undefined) {
    listener = await runtime.listenUnix(options.unixSocket, accept);
  } else {
    listener = await runtime.listenTcp(options.hostname, options.port ?? NBD_DEFAULT_PORT, accept);
  }

  let closing: Promise<void> | null = null;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      shuttingDown = true;
      listener?.close();
      // Ending the readers lets each transmission loop finish what is in flight.
      await Promise.all([...active].map((e) => e.reader.cancel()));
      await Promise.all([...active].map((e) => e.done));
      try {
        await plugin.unload?.();
      } catch (err) {
        log.error(`unload: ${messageOf(err)}`);
      }
      if (options.unixSocket !== undefined) await runtime.removeFile(options.unixSocket);
      resolveFinished();
    })();
    return closing;
  };

  if (options.stdio) {
    Promise.all([...active].map((e) => e.done)).then(close);
  }

  return {
    get address() {
      return listener?.address ?? null;
    },
    get connections() {
      return active.size;
    },
    finished,
    close,
  };
}
