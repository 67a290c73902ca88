/**
 * `-v`: every request a connection makes of its plugin, one debug line each,
 * in the words of nbdkit's `-v` (`pread count=512 offset=0`), so that a
 * client's behaviour can be read off the server's stderr side by side with
 * nbdkit's.
 *
 * Only verbose servers wrap their sessions: without `-v` the request loop
 * calls the plugin's session directly and pays nothing for this.
 *
 * @module
 */
import type { ExportSession, ZeroOptions } from "../protocol/session.ts";
import type { Awaitable, LentBytes } from "../plugins/plugin.ts";

/**
 * A flag as nbdkit's `-v` writes it: 1 or 0.
 *
 * @example
 * ```ts
 * import { bit } from "./trace.ts";
 * console.assert(`fua=${bit(true)}` === "fua=1");
 * ```
 */
export const bit = (on: boolean): 0 | 1 => (on ? 1 : 0);

/**
 * A session that logs each call before passing it on.
 *
 * @param session The session to trace.
 * @param debug Where the lines go (the connection's debug logger).
 * @returns A session with the same answers, bytes and errors.
 *
 * @example
 * ```ts
 * import { tracedSession } from "./trace.ts";
 * import type { ExportSession } from "../protocol/session.ts";
 * const lines: string[] = [];
 * const disk = new Uint8Array(4096);
 * const session = {
 *   name: "",
 *   size: 4096n,
 *   flags: 1,
 *   description: undefined,
 *   blockSize: undefined,
 *   read: (buf: Uint8Array, offset: number) => void buf.set(disk.subarray(offset, offset + buf.length)),
 *   write: () => {},
 *   flush: () => Promise.resolve(),
 *   trim: () => Promise.resolve(),
 *   zero: () => Promise.resolve(),
 *   cache: () => Promise.resolve(),
 *   extents: (count: number) => Promise.resolve([count, 0]),
 *   close: () => Promise.resolve(),
 * } satisfies ExportSession;
 * tracedSession(session, (m) => lines.push(m)).read(new Uint8Array(512), 1024);
 * console.assert(lines[0] === "pread count=512 offset=1024");
 * ```
 */
export function tracedSession(
  session: ExportSession,
  debug: (message: string) => void,
): ExportSession {
  let closed = false;
  return {
    name: session.name,
    size: session.size,
    flags: session.flags,
    description: session.description,
    blockSize: session.blockSize,
    readFillsBuffer: session.readFillsBuffer,
    read(buf: Uint8Array, offset: number): Awaitable<void | LentBytes> {
      debug(`pread count=${buf.length} offset=${offset}`);
      return session.read(buf, offset);
    },
    write(buf: Uint8Array, offset: number, fua: boolean): Awaitable<void> {
      debug(`pwrite count=${buf.length} offset=${offset} fua=${bit(fua)}`);
      return session.write(buf, offset, fua);
    },
    flush() {
      debug("flush");
      return session.flush();
    },
    trim(count: number, offset: number, fua: boolean) {
      debug(`trim count=${count} offset=${offset} fua=${bit(fua)}`);
      return session.trim(count, offset, fua);
    },
    zero(count: number, offset: number, o: ZeroOptions) {
      debug(
        `zero count=${count} offset=${offset} may_trim=${bit(o.mayTrim)} fua=${bit(o.fua)} ` +
          `fast=${bit(o.fastZero)}`,
      );
      return session.zero(count, offset, o);
    },
    cache(count: number, offset: number) {
      debug(`cache count=${count} offset=${offset}`);
      return session.cache(count, offset);
    },
    extents(count: number, offset: number, reqOne: boolean) {
      debug(`extents count=${count} offset=${offset} req_one=${bit(reqOne)}`);
      return session.extents(count, offset, reqOne);
    },
    close() {
      // The session may be closed twice (the connection's end and the
      // server's stop): one line, as nbdkit's one close.
      if (!closed) debug("close");
      closed = true;
      return session.close();
    },
  };
}
