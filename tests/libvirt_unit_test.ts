/**
 * The libvirt plugin's pure parts, without libvirt: the domain XML parser
 * and the peek scheduler (splitting, merging, the 64 KiB fallback), the
 * latter against a fake domain.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { type BlockInfo, type LibvirtDomain, LibvirtError } from "../plugins/libvirt/bindings.ts";
import { parseDisks } from "../plugins/libvirt/disks.ts";
import { PEEK_FALLBACK, PeekScheduler } from "../plugins/libvirt/peeks.ts";

/** A disk whose byte at offset n is n % 251, recording every peek. */
class FakeDomain implements LibvirtDomain {
  peeks: [number, number][] = [];
  inFlight = 0;
  maxInFlight = 0;
  constructor(readonly refuseOver = Infinity) {}
  xmlDesc(): string {
    return "<domain/>";
  }
  blockInfo(): BlockInfo {
    return { capacity: 1n << 30n, allocation: 0n, physical: 0n };
  }
  async blockPeek(_disk: string, offset: number, buf: Uint8Array): Promise<void> {
    this.peeks.push([offset, buf.length]);
    this.maxInFlight = Math.max(this.maxInFlight, ++this.inFlight);
    await new Promise((r) => setTimeout(r, 1));
    this.inFlight--;
    if (buf.length > this.refuseOver) {
      throw new LibvirtError("internal error: size > maximum buffer size", 1);
    }
    for (let i = 0; i < buf.length; i++) buf[i] = (offset + i) % 251;
  }
  free(): void {}
}

function expected(offset: number, length: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (offset + i) % 251);
}

describe("parseDisks", () => {
  test("reads the devices' disks only, not metadata, backing stores or mirrors", () => {
    const xml = `<?xml version="1.0"?>
<domain type='kvm'>
  <metadata><app:x xmlns:app="urn:x"><disk><target dev='zz'/></disk></app:x></metadata>
  <!-- <disk><target dev='yy'/></disk> -->
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/a&amp;b&apos;s.qcow2' index='2'/>
      <backingStore type='file' index='1'>
        <format type='raw'/><source file='/images/base.raw'/><backingStore/>
      </backingStore>
      <mirror type='file' file='/images/m.raw' format='raw' job='copy'>
        <format type='raw'/><source file='/images/m.raw'/>
      </mirror>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>
    <disk type="network" device="disk"><source protocol="nbd" name="exp"><host name="h"/></source><target dev="vdb"/></disk>
    <disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdc'/></disk>
    <disk type='block' device='lun'><source dev='/dev/sdx'/><target dev='sdx' bus='scsi'/></disk>
  </devices>
</domain>`;
    assert.deepEqual(parseDisks(xml), [
      { device: "disk", format: "qcow2", source: "/images/a&b's.qcow2", target: "vda" },
      { device: "cdrom", format: "raw", target: "hdc" },
      { device: "disk", source: "nbd:exp", target: "vdb" },
      { device: "disk", source: "p/v", target: "vdc" },
      { device: "lun", source: "/dev/sdx", target: "sdx" },
    ]);
  });
});

describe("PeekScheduler", () => {
  test("splits a large read into peeks of at most 1 MiB, bytes in place", async () => {
    const dom = new FakeDomain();
    const s = new PeekScheduler();
    const buf = new Uint8Array(3 * 1024 * 1024 + 5);
    await s.read(dom, "sda", buf, 7);
    assert.deepEqual(buf, expected(7, buf.length));
    assert.ok(dom.peeks.every(([, n]) => n <= 1024 * 1024));
    assert.equal(dom.peeks.length, 4);
  });

  test("at most 4 peeks in flight; waiting adjacent reads are merged and lent their part", async () => {
    const dom = new FakeDomain();
    const s = new PeekScheduler();
    const size = 256 * 1024;
    const bufs = Array.from({ length: 32 }, () => new Uint8Array(size));
    const results = await Promise.all(bufs.map((b, i) => s.read(dom, "sda", b, i * size)));
    results.forEach((lent, i) => {
      // Filled in place, or (merged) lent the bytes, leaving the buffer alone.
      const got = lent ? lent.bytes : bufs[i];
      assert.deepEqual(got, expected(i * size, size), `read ${i}`);
      if (lent) assert.ok(bufs[i].every((b) => b === 0), `read ${i}: its buffer untouched`);
      lent?.release?.();
    });
    assert.equal(dom.maxInFlight, 4);
    // 4 started at once, the other 28 merged four by four into 1 MiB peeks.
    assert.equal(dom.peeks.length, 4 + 7);
    assert.equal(results.filter((r) => r !== undefined).length, 28);
  });

  test("a merged peek's buffer is reused only once every read released its part", async () => {
    const dom = new FakeDomain();
    const s = new PeekScheduler(1024 * 1024, 1); // one peek at a time: the rest wait and merge
    const size = 256 * 1024;
    const batch = (first: number) =>
      Promise.all(
        Array.from({ length: 5 }, (_, i) =>
          s.read(dom, "sda", new Uint8Array(size), (first + i) * size)),
      );
    const one = await batch(0); // the first alone, then four merged
    const kept = one.filter((r) => r !== undefined);
    assert.equal(kept.length, 4);
    kept.slice(1).forEach((lent) => lent!.release!());
    kept[1].release!(); // twice: counted once
    const two = await batch(8); // the first spare is still lent (kept[0]): a new one
    assert.notEqual(two[1]!.bytes.buffer, kept[0]!.bytes.buffer);
    assert.deepEqual(
      kept[0]!.bytes,
      expected(1 * size, size),
      "the unreleased part kept its bytes",
    );
    kept[0]!.release!();
    two.forEach((lent) => lent?.release?.());
    const three = await batch(16); // now a released spare is reused
    for (const [i, lent] of three.entries()) {
      if (lent) assert.deepEqual(lent.bytes, expected((16 + i) * size, size));
    }
    const reused = [two[1]!.bytes.buffer, kept[0]!.bytes.buffer];
    assert.ok(reused.includes(three[1]!.bytes.buffer), "a released spare is taken again");
  });

  test("a connection refusing large peeks: 64 KiB peeks from then on", async () => {
    const dom = new FakeDomain(PEEK_FALLBACK);
    const s = new PeekScheduler();
    const buf = new Uint8Array(300 * 1024);
    await s.read(dom, "sda", buf, 1000);
    assert.deepEqual(buf, expected(1000, buf.length));
    assert.equal(s.peekMax, PEEK_FALLBACK);
    dom.peeks = [];
    await s.read(dom, "sda", buf, 0);
    assert.ok(dom.peeks.every(([, n]) => n <= PEEK_FALLBACK));
  });

  test("errors reach every read, merged or not", async () => {
    const dom = new FakeDomain(0); // refuses everything
    const s = new PeekScheduler();
    await assert.rejects(s.read(dom, "sda", new Uint8Array(1024 * 1024), 0), /size > maximum/);
    const results = await Promise.allSettled(
      Array.from({ length: 8 }, (_, i) => s.read(dom, "sda", new Uint8Array(4096), i * 4096)),
    );
    assert.ok(results.every((r) => r.status === "rejected"));
  });
});
