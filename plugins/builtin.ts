/**
 * The built-in plugins, by name, loaded on demand so that a plugin's
 * dependencies (FFI for libvirt) are touched only when it is used.
 *
 * @module
 */
import type { Plugin } from "./plugin.ts";

/** Loaders of the built-in plugins. */
export const BUILTIN_PLUGINS: Record<string, () => Promise<Plugin<unknown>>> = {
  memory: async () => (await import("./memory.ts")).default as Plugin<unknown>,
  null: async () => (await import("./null.ts")).default as Plugin<unknown>,
  file: async () => (await import("./file.ts")).default as Plugin<unknown>,
  streaming: async () => (await import("./streaming.ts")).default as Plugin<unknown>,
  libvirt: async () => (await import("./libvirt/mod.ts")).default as Plugin<unknown>,
};
