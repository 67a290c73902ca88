/**
 * nbdkit-ts: write NBD (Network Block Device) servers in TypeScript, with
 * nbdkit's plugin model, on Deno, Bun and Node.
 *
 * @example Serve a 1 GiB RAM disk on a Unix socket
 * ```ts ignore
 * import { createMemoryPlugin, serve } from "nbdkit-ts";
 * const server = await serve(createMemoryPlugin(), {
 *   config: { size: "1G" },
 *   unixSocket: "/tmp/ram.sock",
 * });
 * console.log(server.uri); // nbd+unix:///?socket=/tmp/ram.sock
 * ```
 *
 * @module
 */
import type { Plugin } from "./plugins/plugin.ts";
import { type ServeOptions, type Server, startServer } from "./server/serve.ts";
import { uriOf } from "./server/uri.ts";

export * from "./plugins/plugin.ts";
export { type Errno, NbdError } from "./plugins/errors.ts";
export { formatSize, parseSize } from "./plugins/size.ts";
export { createMemoryPlugin } from "./plugins/memory.ts";
export { createNullPlugin } from "./plugins/null.ts";
export { createFilePlugin } from "./plugins/file.ts";
export type { ServeOptions, Server } from "./server/serve.ts";
export type { ListenAddress } from "./runtime/types.ts";
export { VERSION } from "./version.ts";

/** Options of {@linkcode serve}: where to listen, plus the plugin's parameters. */
export interface EmbedOptions extends ServeOptions {
  /** Parameters passed to `config` in order, then `configComplete` runs. */
  config?: Record<string, string>;
}

/** A server started by {@linkcode serve}. */
export interface RunningServer extends Server {
  /** The NBD URI clients connect to (empty with `stdio`). */
  readonly uri: string;
}

/**
 * Start an NBD server for a plugin inside your program.
 *
 * Runs the plugin's `config` for each entry of `options.config`, then
 * `configComplete` and `getReady`, and listens (TCP port 10809 unless
 * `port` or `unixSocket` says otherwise; `port: 0` picks a free port).
 *
 * @param plugin The plugin.
 * @param options Where to listen and how to configure the plugin.
 * @returns The running server, with its address, URI and `close()`.
 *
 * @example
 * ```ts ignore
 * import { definePlugin, serve } from "nbdkit-ts";
 * const disk = new Uint8Array(1 << 20);
 * const server = await serve(definePlugin({
 *   name: "ram",
 *   open: () => disk,
 *   getSize: (d) => d.length,
 *   pread: (d, buf, offset) => void buf.set(d.subarray(offset, offset + buf.length)),
 *   pwrite: (d, buf, offset) => void d.set(buf, offset),
 * }), { port: 0 });
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
