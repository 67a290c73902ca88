/**
 * The libvirt bindings for the runtime in use, loaded on demand: importing
 * this module loads no native code and needs no FFI permission.
 *
 * @module
 */
import type { LibvirtBindings } from "../../plugins/libvirt/bindings.ts";
import { runtime } from "../mod.ts";

let loaded: Promise<LibvirtBindings> | undefined;

/**
 * Load `libvirt.so.0` through the runtime's FFI (once per process).
 *
 * @returns The bindings.
 * @throws {Error} When `libvirt.so.0` (or, on Node, koffi) cannot be loaded;
 *   the message is one line and names the Debian package.
 */
export function loadLibvirt(): Promise<LibvirtBindings> {
  loaded ??= (async () => {
    switch (runtime.name) {
      case "deno":
        return (await import("./deno.ts")).loadLibvirt();
      case "bun":
        return await (await import("./bun.ts")).loadLibvirt();
      case "node":
        return await (await import("./node.ts")).loadLibvirt();
    }
  })();
  // A failed load may be retried (e.g. after installing the package).
  loaded.catch(() => loaded = undefined);
  return loaded;
}
