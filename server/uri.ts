/**
 * NBD URIs of listening addresses.
 *
 * @module
 */
import type { ListenAddress } from "../runtime/types.ts";

/**
 * The NBD URI of a listening address, as nbdkit prints it.
 *
 * @param address Where the server listens.
 * @param exportName The default export's name.
 * @returns `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT`, or "" for a
 *   socket the server was given.
 */
export function uriOf(address: ListenAddress, exportName: string): string {
  const path = exportName === "" ? "" : `/${encodeURIComponent(exportName)}`;
  if (address.transport === "unix") {
    return `nbd+unix://${path || "/"}?socket=${encodeURI(address.path)}`;
  }
  if (address.transport === "inherited") return ""; // the parent knows, not we
  let host = address.hostname;
  if (host === "0.0.0.0" || host === "::" || host === "") host = "localhost";
  else if (host.includes(":")) host = `[${host}]`;
  return `nbd://${host}:${address.port}${path}`;
}
