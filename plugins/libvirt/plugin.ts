/**
 * The libvirt plugin: read-only access to the disks of a libvirt guest,
 * through libvirt's `virDomainBlockPeek`, locally or over a remote libvirt
 * connection. Modelled on nbdkit-libvirt-plugin(1).
 *
 * ```
 * nbdkit-ts libvirt [connect=URI] domain=DOMAIN [disk=DISK]
 * ```
 *
 * Parameters:
 * - `connect=URI` (optional): the libvirt connection URI, e.g.
 *   `qemu:///system` or `qemu+tcp://host/system`; libvirt's default
 *   (`LIBVIRT_DEFAULT_URI`, …) when absent.
 * - `domain=DOMAIN` (required): the domain (guest) name.
 * - `disk=DISK` (optional): the disk to serve, by target (`sda`) or by
 *   source path, as `virsh domblklist DOMAIN` shows them. Without it, every
 *   raw disk of the domain is an export named by its target (the first one
 *   is the default export), and `nbdinfo --list` shows them.
 *
 * The export's size is the disk's capacity (`virDomainGetBlockInfo`), the
 * size the guest sees. Only raw disks can be read: libvirt refuses to peek
 * into any other format, and says so when a client connects.
 *
 * @module
 */
import { NbdError } from "../errors.ts";
import type { ExportInfo, LentBytes, OpenContext, Plugin } from "../plugin.ts";
import { loadLibvirt } from "../../runtime/libvirt/mod.ts";
import { VERSION } from "../../version.ts";
import {
  type LibvirtBindings,
  type LibvirtConnection,
  type LibvirtDomain,
  LibvirtError,
  VIR_ERR_INVALID_ARG,
} from "./bindings.ts";
import { type DomainDisk, parseDisks } from "./disks.ts";
import { PeekScheduler } from "./peeks.ts";

/** A libvirt connection and the peeks made on it. */
interface Link {
  conn: LibvirtConnection;
  peeks: PeekScheduler;
}

/** The per-connection handle. */
interface Handle {
  link: Link;
  dom: LibvirtDomain;
  disk: DomainDisk;
  size: bigint;
}

const configHelp = `connect=<URI>     (optional) libvirt connection URI
domain=<DOMAIN>   (required) libvirt domain name
disk=<DISK>       (optional) guest disk: target (sda) or source path; all disks if omitted`;

/** The disks libvirt can peek into: those with a source, in raw format. */
function servable(disks: DomainDisk[]): DomainDisk[] {
  return disks.filter((d) => d.source !== undefined && (d.format ?? "raw") === "raw");
}

/** The error the client gets: EINVAL for a disk libvirt does not know, EIO otherwise. */
function nbdError(err: unknown): NbdError {
  if (err instanceof NbdError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const invalid = err instanceof LibvirtError && err.code === VIR_ERR_INVALID_ARG;
  return new NbdError(invalid ? "EINVAL" : "EIO", message, { cause: err });
}

/**
 * Create a libvirt plugin, as `nbdkit-ts libvirt` uses: each one has its
 * own parameters (`connect`, `domain`, `disk`) and its own libvirt
 * connection, opened by `getReady` and closed by `unload`, so that several
 * can serve different guests or disks in one process.
 *
 * @returns A fresh, unconfigured plugin.
 *
 * @example Two disks of one guest, each on its own socket (needs libvirtd)
 * ```ts ignore
 * import { createLibvirtPlugin } from "./plugin.ts";
 * import { serve } from "../../mod.ts";
 * const a = await serve(createLibvirtPlugin(), {
 *   config: { domain: "MyGuest", disk: "sda" },
 *   unixSocket: "/tmp/sda.sock",
 * });
 * const b = await serve(createLibvirtPlugin(), {
 *   config: { domain: "MyGuest", disk: "sdb" },
 *   unixSocket: "/tmp/sdb.sock",
 * });
 * // nbdcopy 'nbd+unix:///?socket=/tmp/sda.sock' sda.raw; likewise sdb
 * await a.close();
 * await b.close();
 * ```
 */
export function createLibvirtPlugin(): Plugin<Handle> {
  // Configuration.
  let uri: string | undefined;
  let domainName: string | undefined;
  let diskName: string | undefined;

  let libvirt: LibvirtBindings | undefined;
  let link: Link | undefined;

  function config(key: string, value: string): void {
    switch (key) {
      case "connect":
        uri = value;
        break;
      case "domain":
        domainName = value;
        break;
      case "disk":
        diskName = value;
        break;
      default:
        throw new Error(`unknown parameter '${key}'`);
    }
  }

  function configComplete(): void {
    if (domainName === undefined) throw new Error("the 'domain' parameter is required");
  }

  /** The shared connection, opened again if libvirtd went away since. */
  function currentLink(): Link {
    if (!link) link = { conn: libvirt!.connect(uri), peeks: new PeekScheduler() };
    return link;
  }

  /** Look the domain up afresh, so that a redefined or restarted domain is seen as it is now. */
  function lookup(): { link: Link; dom: LibvirtDomain } {
    let l = currentLink();
    try {
      return { link: l, dom: l.conn.lookupDomain(domainName!) };
    } catch (err) {
      // libvirtd restarted, or the network dropped: reconnect once and retry.
      if (l.conn.isAlive()) throw err;
      l.conn.close();
      link = undefined;
      l = currentLink();
      return { link: l, dom: l.conn.lookupDomain(domainName!) };
    }
  }

  /** The disk that `name` (a target or a source path) designates, or the first raw disk for "". */
  function findDisk(dom: LibvirtDomain, name: string): DomainDisk {
    const disks = parseDisks(dom.xmlDesc());
    if (name === "") {
      const first = servable(disks)[0];
      if (!first) throw new LibvirtError(`domain '${domainName}' has no raw disk to serve`, 0);
      return first;
    }
    // libvirt is the judge of names we do not find: it throws its own message
    // for an unknown disk, and may know sources this parser does not name.
    return disks.find((d) => d.target === name || d.source === name) ??
      (dom.blockInfo(name), { target: name, device: "disk" });
  }

  /** Open the disk: its size, and a one-byte peek that fails now if libvirt cannot read it. */
  async function openDisk(name: string): Promise<Handle> {
    const { link, dom } = lookup();
    try {
      const disk = findDisk(dom, name);
      const { capacity } = dom.blockInfo(disk.target);
      // A zero-byte peek fails even on raw disks, so read one byte; this is
      // where libvirt refuses qcow2 and disks it may not open.
      if (capacity > 0n) await dom.blockPeek(disk.target, 0, new Uint8Array(1));
      return { link, dom, disk, size: capacity };
    } catch (err) {
      dom.free();
      throw err;
    }
  }

  async function getReady(): Promise<void> {
    libvirt = await loadLibvirt();
    // Fail at start-up, with libvirt's message, for a domain or disk that
    // cannot be served; clients opened later look the domain up again.
    const handle = await openDisk(diskName ?? "");
    handle.dom.free();
  }

  function unload(): void {
    link?.conn.close();
    link = undefined;
  }

  function listExports(): ExportInfo[] {
    const { dom } = lookup();
    try {
      // Only what can be served: a listed export that fails to open makes
      // `nbdinfo --list` fail as a whole.
      const disks = servable(parseDisks(dom.xmlDesc())).filter((d) =>
        diskName === undefined || d.target === diskName || d.source === diskName
      );
      return disks.map((d) => ({ name: d.target, description: d.source }));
    } finally {
      dom.free();
    }
  }

  async function open(ctx: OpenContext): Promise<Handle> {
    try {
      // With disk=, the export name does not matter, as in nbdkit.
      return await openDisk(diskName ?? ctx.exportName);
    } catch (err) {
      throw nbdError(err);
    }
  }

  async function pread(h: Handle, buf: Uint8Array, offset: number): Promise<LentBytes | undefined> {
    try {
      return await h.link.peeks.read(h.dom, h.disk.target, buf, offset);
    } catch (err) {
      throw nbdError(err);
    }
  }

  return {
    name: "libvirt",
    longname: "nbdkit-ts libvirt plugin",
    version: VERSION,
    configHelp,
    threadModel: "parallel",
    preadFillsBuffer: true,
    config,
    configComplete,
    getReady,
    unload,
    listExports,
    defaultExport: () => listExports()[0]?.name ?? "",
    open,
    close: (h) => h.dom.free(),
    getSize: (h) => h.size,
    exportDescription: (h) => h.disk.source,
    canWrite: () => false,
    canMultiConn: () => true,
    pread,
  };
}

/**
 * The libvirt plugin that `nbdkit-ts libvirt` serves: one instance made by
 * {@linkcode createLibvirtPlugin}.
 *
 * @example Serving a guest's disk
 * ```ts ignore
 * // nbdkit-ts libvirt domain=MyGuest disk=sda
 * // guestfish --ro --format=raw -a nbd://localhost
 * ```
 */
const libvirtPlugin: Plugin<Handle> = createLibvirtPlugin();

export default libvirtPlugin;
