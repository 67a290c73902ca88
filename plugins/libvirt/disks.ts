/**
 * The disks of a libvirt domain, read from its XML description.
 *
 * libvirt writes this XML itself, so a small tokenizer is enough: it walks
 * the tags, keeps the path of open elements, and reads the `<disk>`
 * elements directly under `<domain><devices>` — not those an application
 * may keep in `<metadata>`, nor the `<source>` of a `<backingStore>` or
 * `<mirror>` nested inside a disk.
 *
 * @module
 */

/** One `<disk>` of a domain. */
export interface DomainDisk {
  /** `<target dev>`: the name the guest sees ("sda", "vda"). */
  target: string;
  /** Where the data lives: the source file, device, volume or network name. */
  source?: string;
  /** `<driver type>`: the image format ("raw", "qcow2"). */
  format?: string;
  /** `<disk device>`: "disk", "cdrom", "floppy" or "lun". */
  device: string;
}

const TOKEN =
  /<!--[\s\S]*?-->|<!\[CDATA\[[\s\S]*?\]\]>|<[?!][^>]*>|<(\/?)([\w.:-]+)((?:\s+[\w.:-]+\s*=\s*(?:'[^']*'|"[^"]*"))*)\s*(\/?)>/g;
const ATTRIBUTE = /([\w.:-]+)\s*=\s*(?:'([^']*)'|"([^"]*)")/g;
const ENTITIES: Record<string, string> = { lt: "<", gt: ">", amp: "&", apos: "'", quot: '"' };

function unescape(text: string): string {
  return text.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|\w+);/g, (whole, name: string) => {
    if (name.startsWith("#x")) return String.fromCodePoint(parseInt(name.slice(2), 16));
    if (name.startsWith("#")) return String.fromCodePoint(parseInt(name.slice(1), 10));
    return ENTITIES[name] ?? whole;
  });
}

function attributes(text: string): Record<string, string> {
  const attrs: Record<string, string> = {};
  for (const m of text.matchAll(ATTRIBUTE)) attrs[m[1]] = unescape(m[2] ?? m[3]);
  return attrs;
}

/** The name a `<source>` element gives its data, whatever the disk type. */
function sourceName(attrs: Record<string, string>): string | undefined {
  if (attrs.file ?? attrs.dev ?? attrs.dir) return attrs.file ?? attrs.dev ?? attrs.dir;
  if (attrs.pool && attrs.volume) return `${attrs.pool}/${attrs.volume}`;
  if (attrs.name) return attrs.protocol ? `${attrs.protocol}:${attrs.name}` : attrs.name;
  return undefined;
}

/**
 * The disks of a domain, in the order of its XML.
 *
 * @param xml What `virDomainGetXMLDesc` returned.
 * @returns Every `<disk>` of `<devices>` that has a `<target dev>`.
 *
 * @example
 * ```ts
 * import { parseDisks } from "./disks.ts";
 * const disks = parseDisks(`<domain><devices>
 *   <disk type='file' device='disk'><driver name='qemu' type='raw'/>
 *     <source file='/var/lib/libvirt/images/a.img'/><target dev='sda' bus='sata'/></disk>
 * </devices></domain>`);
 * console.assert(disks[0].target === "sda" && disks[0].format === "raw");
 * ```
 */
export function parseDisks(xml: string): DomainDisk[] {
  const disks: DomainDisk[] = [];
  const path: string[] = [];
  let disk: Partial<DomainDisk> | undefined;
  for (const [, close, name, attrText, selfClose] of xml.matchAll(TOKEN)) {
    if (name === undefined) continue; // comment, CDATA, declaration
    if (close) {
      path.pop();
      if (name === "disk" && disk && path.join("/") === "domain/devices") {
        if (disk.target) disks.push(disk as DomainDisk);
        disk = undefined;
      }
      continue;
    }
    const where = path.join("/");
    const attrs = attributes(attrText);
    if (name === "disk" && where === "domain/devices") {
      disk = { device: attrs.device ?? "disk" };
    } else if (disk && where === "domain/devices/disk") {
      // Only the disk's own children: a <backingStore> or <mirror> has a <source> too.
      if (name === "target") disk.target = attrs.dev;
      else if (name === "source") disk.source = sourceName(attrs);
      else if (name === "driver") disk.format = attrs.type;
    }
    if (!selfClose) path.push(name);
    else if (name === "disk" && disk) disk = undefined; // <disk/> with no children
  }
  return disks;
}
