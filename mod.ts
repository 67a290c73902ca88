/**
 * nbdkit-ts: write NBD (Network Block Device) servers in TypeScript, with
 * nbdkit's plugin model, on Deno, Bun and Node.
 *
 * A plugin is one object: a `name`, `open` (a client connects: return its
 * handle), `getSize` and `pread`, plus whatever else it can do: `pwrite`,
 * `flush`, `trim`, `zero`, `extents`… What the server offers clients follows
 * from the callbacks present, as in nbdkit: without `pwrite` the export is
 * read-only. {@linkcode Plugin} documents the contract callback by callback.
 *
 * - {@linkcode definePlugin} types a plugin, inferring its handle from `open`.
 * - {@linkcode serve} serves a plugin inside your program; the command line
 *   `nbdkit-ts ./myplugin.ts key=value` serves a module's default export.
 * - {@linkcode NbdError} chooses the errno a client sees; {@linkcode parseSize}
 *   reads sizes as nbdkit writes them (`1G`, `4k`, `2s`…).
 * - Built in: {@linkcode createMemoryPlugin}, {@linkcode createNullPlugin},
 *   {@linkcode createFilePlugin}, {@linkcode createStreamingPlugin},
 *   {@linkcode createLibvirtPlugin} and {@linkcode libvirtPlugin}.
 *
 * @example A RAM disk of your own, served on a free TCP port
 * ```ts
 * import { definePlugin, serve } from "@nbdkit-ts/nbdkit-ts";
 *
 * const disk = new Uint8Array(1024 * 1024);
 * const server = await serve(
 *   definePlugin({
 *     name: "ramdisk",
 *     open: () => disk,
 *     getSize: (d) => d.length,
 *     pread: (d, buf, offset) => void buf.set(d.subarray(offset, offset + buf.length)),
 *     pwrite: (d, buf, offset) => void d.set(buf, offset),
 *   }),
 *   { hostname: "127.0.0.1", port: 0 },
 * );
 * console.log(`try: nbdinfo ${server.uri}`); // nbd://127.0.0.1:PORT
 * await server.close();
 * ```
 *
 * @module
 */
import type { Plugin } from "./plugins/plugin.ts";
import { createFilePlugin as createFilePluginOf } from "./plugins/file.ts";
import libvirt, { createLibvirtPlugin as createLibvirtPluginOf } from "./plugins/libvirt/mod.ts";
import { type ServeOptions, type Server, startServer } from "./server/serve.ts";
import { uriOf } from "./server/uri.ts";

export * from "./plugins/plugin.ts";
export { type Errno, NbdError } from "./plugins/errors.ts";
export { formatSize, parseSize } from "./plugins/size.ts";
export { stdioSafe } from "./plugins/stdio.ts";
export { parseBool } from "./plugins/bool.ts";
export { debug } from "./plugins/debug.ts";
export { createMemoryPlugin } from "./plugins/memory.ts";
export { createNullPlugin } from "./plugins/null.ts";
export type { ServeOptions, Server } from "./server/serve.ts";
export type { ListenAddress } from "./runtime/types.ts";
export { VERSION } from "./version.ts";

/**
 * Create a file plugin, as `nbdkit-ts file FILE` uses: it serves a file or
 * block device (`file=`), or each file of a directory as an export (`dir=`),
 * read-write unless the server is read-only or the file may only be read;
 * `cache=` and `fadvise=` tune the page cache (see `nbdkit-ts file --help`).
 * Its handle is opaque: pass it back.
 *
 * @returns A fresh, unconfigured plugin.
 *
 * @example Serve a disk image read-only
 * ```ts
 * import { createFilePlugin, serve } from "@nbdkit-ts/nbdkit-ts";
 * import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
 * import { tmpdir } from "node:os";
 * import { join } from "node:path";
 *
 * const dir = mkdtempSync(join(tmpdir(), "doc-"));
 * const image = join(dir, "disk.img");
 * writeFileSync(image, new Uint8Array(1024 * 1024));
 * const server = await serve(createFilePlugin(), {
 *   config: { file: image },
 *   readonly: true,
 *   hostname: "127.0.0.1",
 *   port: 0,
 * });
 * await server.close();
 * rmSync(dir, { recursive: true });
 * ```
 */
export function createFilePlugin(): Plugin {
  return createFilePluginOf();
}

/** Options of {@linkcode serve}: where and how to listen, plus the plugin's parameters. */
export interface EmbedOptions extends ServeOptions {
  /**
   * The plugin's parameters, as `key=value` on the command line would give
   * them: `config` is called for each, in order, then `configComplete`.
   *
   * @example
   * ```ts
   * import { createMemoryPlugin, serve } from "@nbdkit-ts/nbdkit-ts";
   * const server = await serve(createMemoryPlugin(), {
   *   config: { size: "1G" }, // nbdkit-ts memory size=1G
   *   hostname: "127.0.0.1",
   *   port: 0,
   * });
   * await server.close();
   * ```
   */
  config?: Record<string, string>;
}

/** A server started by {@linkcode serve}. */
export interface RunningServer extends Server {
  /**
   * The NBD URI clients connect to, as nbdkit's `$uri` (empty with `stdio`):
   * `nbd+unix:///?socket=PATH` or `nbd://HOST:PORT`, with the export name.
   *
   * @example
   * ```ts
   * import { createNullPlugin, serve } from "@nbdkit-ts/nbdkit-ts";
   * const server = await serve(createNullPlugin(), { hostname: "127.0.0.1", port: 0 });
   * if (server.address?.transport === "tcp") {
   *   console.assert(server.uri === `nbd://127.0.0.1:${server.address.port}`);
   * }
   * await server.close();
   * ```
   */
  readonly uri: string;
}

/**
 * Start an NBD server for a plugin inside your program.
 *
 * Gives the plugin its parameters (`options.config`: `config` for each, then
 * `configComplete`), calls `getReady`, and listens: on `unixSocket` when
 * given, otherwise on TCP `port` (10809 when absent; 0 picks a free port) of
 * `hostname` (every address when absent). It resolves once the server
 * accepts connections; `close()` stops it, lets requests already received
 * finish, calls `unload` and removes the Unix socket.
 *
 * @param plugin The plugin.
 * @param options Where and how to listen, and the plugin's parameters.
 * @returns The running server, with its address, URI and `close()`.
 * @throws {Error} A parameter the plugin refuses (`config` or
 *   `configComplete` threw), or an address that cannot be listened on;
 *   nothing listens then.
 *
 * @example On a Unix socket, with a client
 * ```ts
 * import { definePlugin, serve } from "@nbdkit-ts/nbdkit-ts";
 * import { mkdtempSync, rmSync } from "node:fs";
 * import { tmpdir } from "node:os";
 * import { join } from "node:path";
 *
 * const dir = mkdtempSync(join(tmpdir(), "doc-"));
 * const socket = join(dir, "nbd.sock");
 * const server = await serve(
 *   definePlugin({
 *     name: "pattern",
 *     open: () => null,
 *     getSize: () => 4096,
 *     pread: (_h, buf, offset) => buf.forEach((_, i) => buf[i] = (offset + i) & 0xff),
 *   }),
 *   { unixSocket: socket },
 * );
 * console.log(server.uri); // nbd+unix:///?socket=/tmp/doc-…/nbd.sock
 * // Any NBD client now works: nbdinfo, nbdcopy, qemu-img, nbdsh, guestfish, fio…
 * await server.close(); // the socket is gone
 * rmSync(dir, { recursive: true });
 * ```
 *
 * @example Parameters, read-only, an export name, a free TCP port
 * ```ts
 * import { createMemoryPlugin, serve } from "@nbdkit-ts/nbdkit-ts";
 * const server = await serve(createMemoryPlugin(), {
 *   config: { size: "64M" },
 *   readonly: true,
 *   exportName: "scratch",
 *   hostname: "127.0.0.1",
 *   port: 0,
 * });
 * console.assert(server.uri.endsWith("/scratch"));
 * await server.close();
 * ```
 */
export async function serve<H>(
  plugin: Plugin<H>,
  options: EmbedOptions = {},
): Promise<RunningServer> {
  for (const [key, value] of Object.entries(options.config ?? {})) {
    if (!plugin.config) throw new Error(`unknown parameter '${key}'`);
    await plugin.config(key, value);
  }
  await plugin.configComplete?.();
  const server = await startServer(plugin, options);
  const uri = server.address ? uriOf(server.address, options.exportName ?? "") : "";
  return {
    get address() {
      return server.address;
    },
    get connections() {
      return server.connections;
    },
    finished: server.finished,
    close: () => server.close(),
    uri,
  };
}

export { createStreamingPlugin } from "./plugins/streaming.ts";

/**
 * Create a libvirt plugin, as `nbdkit-ts libvirt [connect=URI]
 * domain=DOMAIN [disk=DISK]` uses: read-only access to a libvirt guest's
 * disks through `virDomainBlockPeek`. Each one has its own parameters and
 * its own libvirt connection (opened by `getReady`, closed by `unload`), so
 * one program can serve several guests or disks, over as many libvirt URIs.
 * libvirt itself is loaded through FFI only by `getReady`. Its handle is
 * opaque: pass it back.
 *
 * @returns A fresh, unconfigured plugin.
 *
 * @example Serve two disks of a guest at once (needs libvirtd and a guest named MyGuest)
 * ```ts ignore
 * import { createLibvirtPlugin, serve } from "@nbdkit-ts/nbdkit-ts";
 * const sda = await serve(createLibvirtPlugin(), {
 *   config: { connect: "qemu:///system", domain: "MyGuest", disk: "sda" },
 *   hostname: "127.0.0.1",
 *   port: 10809,
 * });
 * const sdb = await serve(createLibvirtPlugin(), {
 *   config: { connect: "qemu:///system", domain: "MyGuest", disk: "sdb" },
 *   hostname: "127.0.0.1",
 *   port: 10810,
 * });
 * // nbdcopy nbd://127.0.0.1 sda.raw; nbdcopy nbd://127.0.0.1:10810 sdb.raw
 * await sda.close();
 * await sdb.close();
 * ```
 */
export function createLibvirtPlugin(): Plugin {
  return createLibvirtPluginOf();
}

/**
 * The libvirt plugin, as `nbdkit-ts libvirt [connect=URI] domain=DOMAIN
 * [disk=DISK]` uses it: read-only access to a libvirt guest's disks through
 * `virDomainBlockPeek`. It is the instance the command line serves; each
 * {@linkcode createLibvirtPlugin} call makes another, with its own parameters
 * and connection. libvirt itself is loaded through FFI only by `getReady`.
 *
 * @example Serve a guest's disk (needs libvirtd and a guest named MyGuest)
 * ```ts ignore
 * import { libvirtPlugin, serve } from "@nbdkit-ts/nbdkit-ts";
 * const server = await serve(libvirtPlugin, {
 *   config: { connect: "qemu:///system", domain: "MyGuest", disk: "sda" },
 *   port: 10809,
 * });
 * // guestfish --ro --format=raw -a nbd://localhost
 * ```
 */
export const libvirtPlugin: Plugin = libvirt;
