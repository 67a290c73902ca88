/**
 * The server: listens, runs the handshake and the transmission phase for
 * each connection against a plugin, and shuts down cleanly.
 *
 * @module
 */
import { ByteReader, EndOfStream } from "../protocol/byte_reader.ts";
import { NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES } from "../protocol/constants.ts";
import { handshake } from "../protocol/handshake.ts";
import type { ExportSession } from "../protocol/session.ts";
import { transmission } from "../protocol/transmission.ts";
import { ProtocolError } from "../protocol/wire.ts";
// Never throws, whatever a plugin threw (an exception in a catch block here
// would be an unhandled rejection, which ends the process).
import { messageOf } from "../plugins/errors.ts";
import type { Plugin } from "../plugins/plugin.ts";
import { runtime } from "../runtime/mod.ts";
import type { Connection, ListenAddress, Listener } from "../runtime/types.ts";
import { pluginProvider } from "./backend.ts";
import { logConfig, logContext, Logger } from "./log.ts";
import { osMessage } from "./os_message.ts";
import { Mutex } from "./mutex.ts";
import { type TlsConfig, tlsUpgrade } from "./tls.ts";

/**
 * Where and how to serve: the listening address and the command line's
 * server options (`-U`, `-p`, `-i`, `-s`, `-r`, `-e`, `-t`, `--no-sr`, …).
 *
 * @example Read-only on a free port of the loopback address
 * ```ts
 * import type { ServeOptions } from "./serve.ts";
 * const options: ServeOptions = { hostname: "127.0.0.1", port: 0, readonly: true };
 * console.assert(options.unixSocket === undefined);
 * ```
 */
export interface ServeOptions {
  /** Listen on this Unix socket path. */
  unixSocket?: string;
  /** Listen on this TCP port (10809 when neither this nor `unixSocket` is given; 0 picks one). */
  port?: number;
  /** The TCP address to bind (every IPv6 and IPv4 address when absent). */
  hostname?: string;
  /**
   * `-4` or `-6`: without `hostname`, listen on every address of that family
   * only (`0.0.0.0`, or `::` without IPv4 clients); with a host name, listen
   * on each of its addresses of that family.
   */
  family?: 4 | 6;
  /** Serve exactly one connection on stdin/stdout (`-s`). */
  stdio?: boolean;
  /**
   * Accept on these listening sockets, inherited as open descriptors
   * (socket activation), instead of opening one.
   */
  listenFds?: number[];
  /** `-r`: read-only for every client. */
  readonly?: boolean;
  /**
   * The name `NBD_OPT_LIST` shows for a plugin without `listExports` ("":
   * the default export). The command line's `-e` does not set it: as
   * nbdkit's, that changes only `$uri` for `--run`.
   */
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
  /**
   * TLS (`loadTls` in `server/tls.ts`); absent: STARTTLS is refused, as with `--tls=off`.
   *
   * @internal Not in the public API (mod.ts) until TLS's own types are.
   */
  tls?: TlsConfig;
}

/**
 * A running server.
 *
 * @example Wait for a server to stop, from elsewhere in the program
 * ```ts
 * import { createNullPlugin, serve } from "../mod.ts";
 * const server = await serve(createNullPlugin(), { hostname: "127.0.0.1", port: 0 });
 * server.finished.then(() => console.log("stopped"));
 * console.assert(server.connections === 0);
 * await server.close();
 * ```
 */
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

/**
 * How long the last replies may take to reach the client once its
 * connection ends (after NBD_CMD_DISC, NBD_OPT_ABORT or an error) before
 * the connection is closed anyway; a shutdown does not wait for it.
 */
const CLOSE_GRACE_MS = 10_000;

/**
 * Whether a transport error only says that the client went away (a reset,
 * or a write after it closed): news for `-v`, not an error of the server.
 * Deno's BadResource is a read of a connection that a failed write (the
 * same reset) has closed meanwhile, and its Interrupted ("operation
 * canceled") a read or write that was pending when that close came.
 */
function peerHungUp(err: unknown): boolean {
  const { code, name } = (err ?? {}) as { code?: unknown; name?: unknown };
  return code === "EPIPE" || code === "ECONNRESET" || name === "BrokenPipe" ||
    name === "ConnectionReset" || name === "BadResource" || name === "Interrupted" ||
    /\(os error (32|104)\)/.test(messageOf(err));
}

/** A listener, or an error that says where it could not listen ("cannot listen on …: why"). */
async function listening(
  what: string,
  prefix: string,
  listen: () => Promise<Listener>,
): Promise<Listener> {
  try {
    return await listen(); // a throw or a rejection, depending on the runtime
  } catch (err) {
    let why = osMessage(err);
    if (prefix && why.startsWith(`${prefix}: `)) why = why.slice(prefix.length + 2);
    throw new Error(`cannot listen on ${what}: ${why}`);
  }
}

/**
 * Listen on every address, IPv6 and IPv4, as nbdkit does. `::` takes both on
 * most systems (`net.ipv6.bindv6only` = 0); a second listener on `0.0.0.0`
 * covers the systems where it does not, and is refused (address in use)
 * where it does. Without IPv6, `0.0.0.0` alone.
 */
async function listenEverywhere(
  port: number,
  accept: (conn: Connection) => void,
): Promise<Listener[]> {
  const where = `*:${port}`;
  let v6: Listener | null = null;
  try {
    v6 = await runtime.listenTcp("::", port, accept);
  } catch {
    // no IPv6 here (or the port is taken: the IPv4 listener says so)
  }
  if (!v6) return [await listening(where, where, () => runtime.listenTcp("0.0.0.0", port, accept))];
  try {
    const bound = v6.address.transport === "tcp" ? v6.address.port : port;
    return [v6, await runtime.listenTcp("0.0.0.0", bound, accept)];
  } catch {
    return [v6]; // dual-stack: IPv4 clients come in through `::`
  }
}

/**
 * Listen on each address of one family that `hostname` stands for, as
 * nbdkit's `-4`/`-6` (`0.0.0.0` or `::` for every address of it; `-i` for
 * others): a numeric address of the other family, or a name without one of
 * this family, is refused. With port 0, the port the
 * first listener got is asked for the others.
 */
async function listenOnFamily(
  hostname: string,
  family: 4 | 6,
  port: number,
  accept: (conn: Connection) => void,
): Promise<Listener[]> {
  const numeric = hostname.includes(":") ? 6 : /^[0-9.]+$/.test(hostname) ? 4 : null;
  if (numeric !== null && numeric !== family) {
    throw new Error(`cannot listen on ${hostname}: not an IPv${family} address (-${family})`);
  }
  const addresses = numeric !== null ? [hostname] : await runtime.lookup(hostname, family).catch(
    (err) => {
      throw new Error(`cannot listen on ${hostname} (-${family}): ${messageOf(err)}`);
    },
  );
  const listeners: Listener[] = [];
  // `-6` keeps IPv4 clients off `::` too, as nbdkit's IPV6_V6ONLY on every
  // IPv6 socket does.
  const options = { ipv6Only: family === 6 };
  try {
    // A name on two lines of /etc/hosts comes back twice: one listener each.
    for (const address of new Set(addresses)) {
      const bound = listeners[0]?.address;
      const p = bound?.transport === "tcp" ? bound.port : port;
      const where = `${family === 6 ? `[${address}]` : address}:${p}`;
      listeners.push(
        await listening(where, where, () => runtime.listenTcp(address, p, accept, options)),
      );
    }
  } catch (err) {
    for (const l of listeners) l.close();
    throw err;
  }
  return listeners;
}

/** The longest Unix socket path Linux binds: `sun_path` is 108 bytes with its NUL. */
const UNIX_PATH_MAX = 107;

/** The default NBD port (IANA's), where a server listens without `port` or `unixSocket`. */
export const NBD_DEFAULT_PORT = 10809;

/** `serialize_connections`: one connection at a time, server wide. */
const connectionLock = new Mutex();

/**
 * Serve a plugin that is already configured (`config`, `configComplete`
 * done). Calls `getReady`, listens, and returns once listening. This is
 * what the command line and {@linkcode serve} (in mod.ts, which configures
 * the plugin first) use.
 *
 * @param plugin The plugin.
 * @param options Where and how.
 * @returns The running server.
 *
 * @example Serve a RAM disk on a Unix socket
 * ```ts
 * import { startServer } from "./serve.ts";
 * import { createMemoryPlugin } from "../plugins/memory.ts";
 * import { mkdtempSync, rmSync } from "node:fs";
 * import { tmpdir } from "node:os";
 * import { join } from "node:path";
 *
 * const memory = createMemoryPlugin();
 * await memory.config!("size", "1G");
 * await memory.configComplete!();
 * const dir = mkdtempSync(join(tmpdir(), "doc-"));
 * const server = await startServer(memory, { unixSocket: join(dir, "nbd.sock") });
 * // nbdinfo "nbd+unix:///?socket=$dir/nbd.sock" sees a 1 GiB disk
 * await server.close();
 * rmSync(dir, { recursive: true });
 * ```
 */
export async function startServer<H>(
  plugin: Plugin<H>,
  options: ServeOptions = {},
): Promise<Server> {
  const log = new Logger();
  // With -v, everything done for a connection (the plugin's callbacks among
  // it) knows which one it is, for the plugin's debug() lines; loaded only
  // then, so that start-up without -v does not pay for it.
  const tracked = logConfig.verbose
    ? (await import("../runtime/async_context.ts")).connectionContext
    : undefined;
  if (tracked) logContext.current = () => tracked.getStore();
  log.debug(`${plugin.name}: get_ready`);
  await plugin.getReady?.();
  /**
   * A client. `stop` closes it during the handshake, does nothing in
   * transmission (`stopping` drains it), and cuts its last replies short once
   * it ends; STARTTLS sets `secure`.
   */
  type Entry = {
    conn: Connection;
    secure?: Connection;
    stop: () => Promise<void>;
    done: Promise<void>;
    /**
     * Aborted by `close()`: the transmission loop then drains (see
     * `stopSignal`). One per client, not one shared signal: Node warns of a
     * leak once an AbortSignal has more than 10 listeners.
     */
    stopping: AbortController;
  };
  const active = new Set<Entry>();
  let shuttingDown = false;
  let counter = 0;
  const listeners: Listener[] = [];
  let resolveFinished!: () => void;
  const finished = new Promise<void>((r) => resolveFinished = r);

  const backendOptions = {
    readonly: options.readonly ?? false,
    exportName: options.exportName ?? "",
  };
  const handshakeFlags = (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES) &
    (options.maskHandshake ?? 0xffff);

  const handle = async (
    entry: Entry,
    reader: ByteReader,
    id: number,
    context: string,
  ): Promise<void> => {
    const { conn } = entry;
    const clog = new Logger(context);
    const traceTo = (m: string) => clog.debug(m);
    clog.debug("accepted connection");
    /** We closed the connection (timeout, shutdown): what fails next is no news. */
    let hungUp = false;
    // A shutdown before transmission closes the connection: there is nothing
    // in flight to finish, and a handshake whose replies the client does not
    // read would not end by itself.
    entry.stop = () => {
      hungUp = true;
      entry.secure?.close();
      conn.close();
      return Promise.resolve();
    };
    const release = plugin.threadModel === "serialize_connections"
      ? await connectionLock.acquire()
      : null;
    let session: ExportSession | null = null;
    let writer: WritableStreamDefaultWriter<Uint8Array> | null = null;
    const timeoutMs = (options.handshakeTimeout ?? 60) * 1000;
    const timer = timeoutMs > 0
      ? setTimeout(() => {
        clog.error(`client did not finish the handshake within ${timeoutMs / 1000} seconds`);
        hungUp = true;
        conn.close();
      }, timeoutMs)
      : undefined;
    try {
      writer = conn.writable.getWriter();
      const negotiated = await handshake(
        reader,
        writer,
        pluginProvider(plugin, backendOptions, id, logConfig.verbose ? traceTo : undefined),
        {
          structuredReplies: options.structuredReplies ?? true,
          metaContexts: options.metaContexts ?? true,
          handshakeFlags,
          tls: options.tls
            ? tlsUpgrade(options.tls, conn, {
              secure(secure, secureWriter) {
                entry.secure = secure;
                // Closed gracefully at the end even when the handshake stops
                // there: the last option reply must go out before close_notify.
                writer = secureWriter;
              },
            })
            : undefined,
          debug: (m) => clog.debug(m),
          error: (m) => clog.error(m),
        },
      );
      clearTimeout(timer);
      if (!negotiated) return;
      // From here `close()` must not cancel the reader: requests the client
      // has already sent would be lost with the connection. The stop signal
      // makes the transmission loop answer them with ESHUTDOWN, finish what
      // is in flight, and then stop reading by itself.
      entry.stop = () => Promise.resolve();
      session = negotiated.session;
      writer = negotiated.writer;
      const inFlight = plugin.threadModel === "serialize_requests" ? 1 : options.threads ?? 16;
      clog.debug(`handshake complete, serving requests with up to ${inFlight} in flight`);
      await transmission(negotiated.reader, negotiated.writer, session, {
        structured: negotiated.structured,
        baseAllocation: negotiated.baseAllocation,
        maxInFlight: inFlight,
        error: (m) => clog.error(m),
        debug: (m) => clog.debug(m),
        shuttingDown: () => shuttingDown,
        stopSignal: entry.stopping.signal,
        hangUp: () => {
          hungUp = true;
          entry.secure?.close();
          conn.close();
        },
      });
    } catch (err) {
      if (err instanceof EndOfStream) clog.debug(`client closed the connection: ${err.message}`);
      else if (peerHungUp(err)) clog.debug(`client closed the connection: ${messageOf(err)}`);
      else if (hungUp) clog.debug(`connection closed by the server: ${messageOf(err)}`);
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
      if (writer) {
        // The last replies go out before the connection closes; but a client
        // that takes none of them holds neither the connection nor a shutdown.
        let force!: () => void;
        const forced = new Promise<"forced">((r) => force = () => r("forced"));
        const grace = setTimeout(force, CLOSE_GRACE_MS);
        entry.stop = () => (force(), Promise.resolve());
        const closed = writer.close().catch(() => {}); // a failure: the peer is gone
        if (await Promise.race([closed, forced]) === "forced") {
          clog.debug("the client did not take the last replies: closing the connection");
        }
        clearTimeout(grace);
      }
      entry.secure?.close();
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
    const entry: Entry = {
      conn,
      stop: () => Promise.resolve(), // handle() sets it before its first await
      done: Promise.resolve(),
      stopping: new AbortController(),
    };
    const id = ++counter;
    const context = `${plugin.name}[${id}]`;
    const served = tracked
      ? tracked.run(context, () => handle(entry, reader, id, context))
      : handle(entry, reader, id, context);
    entry.done = served.finally(() => active.delete(entry));
    active.add(entry);
  };

  if (options.stdio) {
    accept(runtime.stdio());
  } else if (options.listenFds !== undefined) {
    for (const fd of options.listenFds) {
      const what = `the inherited socket ${fd}`;
      listeners.push(await listening(what, "", () => runtime.listenFd(fd, accept)));
    }
  } else if (options.unixSocket !== undefined) {
    const path = options.unixSocket;
    const unix = await listening(
      `Unix socket ${path}`,
      path,
      () => {
        // Node would bind a truncated name, Deno and Bun fail with EINVAL:
        // say what is wrong, in nbdkit's words.
        const length = new TextEncoder().encode(path).length;
        if (length > UNIX_PATH_MAX) {
          throw new Error(`path too long: length ${length} > max ${UNIX_PATH_MAX} bytes`);
        }
        return runtime.listenUnix(path, accept);
      },
    );
    listeners.push(unix);
  } else if (options.family !== undefined) {
    // Without a host name: every address of the family (`::` with -6 takes
    // no IPv4 client, see listenOnFamily).
    const every = options.family === 4 ? "0.0.0.0" : "::";
    listeners.push(
      ...await listenOnFamily(
        options.hostname ?? every,
        options.family,
        options.port ?? NBD_DEFAULT_PORT,
        accept,
      ),
    );
  } else if (options.hostname !== undefined) {
    const { hostname } = options;
    const port = options.port ?? NBD_DEFAULT_PORT;
    const where = `${hostname}:${port}`;
    listeners.push(await listening(where, where, () => runtime.listenTcp(hostname, port, accept)));
  } else {
    listeners.push(...await listenEverywhere(options.port ?? NBD_DEFAULT_PORT, accept));
  }

  for (const { address: a } of listeners) {
    log.debug(
      a.transport === "unix"
        ? `bound to unix socket ${a.path}`
        : a.transport === "tcp"
        ? `bound to IP address ${
          a.hostname.includes(":") ? `[${a.hostname}]` : a.hostname
        }:${a.port}`
        : `serving the inherited socket ${a.fd}`,
    );
  }

  let closing: Promise<void> | null = null;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      shuttingDown = true;
      for (const e of active) e.stopping.abort();
      for (const l of listeners) l.close();
      // Connections still in the handshake are closed; those in transmission
      // finish what is in flight and answer later requests with ESHUTDOWN.
      await Promise.all([...active].map((e) => e.stop()));
      await Promise.all([...active].map((e) => e.done));
      log.debug(`${plugin.name}: unload`);
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
      return listeners[0]?.address ?? null;
    },
    get connections() {
      return active.size;
    },
    finished,
    close,
  };
}
