/**
 * The memory plugin's sparse array against a flat model: random writes,
 * zeroes and reads of every size, aligned and not, with large reads lent
 * from the disk's slabs and the rest copied. Real clients drive the plugin
 * in tests/clients_test.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { SparseArray } from "../plugins/memory.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4 * KiB;

/** A small deterministic generator (xorshift32), so a failure can be replayed. */
function random(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

/** Equal bytes; a failure names the first difference (a diff of megabytes would take minutes). */
function sameBytes(got: Uint8Array, want: Uint8Array, what: string): void {
  assert.equal(got.length, want.length, what);
  const i = got.findIndex((b, j) => b !== want[j]);
  if (i >= 0) assert.fail(`${what}: byte ${i} is ${got[i]}, should be ${want[i]}`);
}

/** What `pread` does: a view when one is lent, else a copy. */
function readBack(disk: SparseArray, count: number, offset: number): Uint8Array {
  const lent = disk.view(count, offset);
  if (lent) {
    assert.equal(lent.length, count);
    return lent.slice();
  }
  const buf = new Uint8Array(count).fill(0xee); // read must overwrite all of it
  disk.read(buf, offset);
  return buf;
}

test("SparseArray agrees with a flat array under random writes, zeroes and reads", () => {
  const size = 8 * MiB;
  const model = new Uint8Array(size);
  const allocated = new Set<number>();
  const disk = new SparseArray();
  const rand = random(20261202);
  const sizes = [
    1,
    512,
    4 * KiB,
    60 * KiB,
    64 * KiB,
    100 * KiB,
    128 * KiB,
    256 * KiB,
    MiB,
    2 * MiB,
  ];
  let lent = 0;
  for (let step = 0; step < 3000; step++) {
    const count = sizes[rand(sizes.length)];
    // Half the offsets aligned to the request, so large reads can be lent.
    const offset = rand(2)
      ? rand(Math.floor((size - count) / count) + 1) * count
      : rand(size - count + 1);
    const op = rand(10);
    if (op < 4) {
      const data = new Uint8Array(count).fill(1 + rand(255));
      data[0] = step & 0xff;
      disk.write(data, offset);
      model.set(data, offset);
      for (let p = Math.floor(offset / PAGE); p * PAGE < offset + count; p++) allocated.add(p);
    } else if (op < 6) {
      disk.zero(count, offset);
      model.fill(0, offset, offset + count);
      // Pages covered are freed, and so are those the zeroes leave all zero.
      for (let p = Math.floor(offset / PAGE); p * PAGE < offset + count; p++) {
        if (model.subarray(p * PAGE, (p + 1) * PAGE).every((b) => b === 0)) allocated.delete(p);
      }
    } else {
      if (disk.view(count, offset)) lent++;
      const got = readBack(disk, count, offset);
      sameBytes(got, model.subarray(offset, offset + count), `step ${step}`);
    }
    assert.equal(disk.allocatedPages, allocated.size, `step ${step}`);
  }
  assert.ok(lent > 100, `only ${lent} reads were lent`);
  // Read it all back, in slabs (lent) and straddling them (copied).
  for (let at = 0; at < size; at += MiB) {
    sameBytes(readBack(disk, MiB, at), model.subarray(at, at + MiB), `at ${at}`);
  }
  for (let at = MiB / 2; at + MiB <= size; at += MiB) {
    sameBytes(readBack(disk, MiB, at), model.subarray(at, at + MiB), `at ${at}`);
  }
  for (let p = 0; p < size / PAGE; p++) assert.equal(disk.allocated(p * PAGE), allocated.has(p));
  // Extents say the same, merged: neighbours differ in type, and they cover the disk.
  let end = 0;
  let last = -1;
  disk.extents(size, 0, (start, length, type) => {
    assert.equal(start, end);
    assert.notEqual(type, last);
    for (let p = start / PAGE; p < (start + length) / PAGE; p++) {
      assert.equal(type === 0, allocated.has(p), `page ${p}`);
    }
    end = start + length;
    last = type;
  });
  assert.equal(end, size);
  // Everything zeroed: every page is freed and what is lent is zero.
  disk.zero(size, 0);
  assert.equal(disk.allocatedPages, 0);
  for (let at = 0; at < size; at += MiB) {
    const view = disk.view(MiB, at);
    assert.ok(view && view.every((b) => b === 0), `at ${at}`);
  }
});

test("SparseArray: small writes cost a 4 KiB page each, a large one gets a slab its reads are lent from", () => {
  const disk = new SparseArray();
  // Scattered 4 KiB writes: one page each, and a large read over them is copied.
  for (let i = 0; i < 4; i++) disk.write(new Uint8Array(4 * KiB).fill(i + 1), i * 256 * KiB);
  assert.equal(disk.allocatedPages, 4);
  assert.equal(disk.view(MiB, 0), undefined);
  // Unwritten space is lent as zeroes.
  assert.ok(disk.view(MiB, 3 * MiB)?.every((b) => b === 0));
  // A large write into the same megabyte moves the small pages into a slab.
  disk.write(new Uint8Array(128 * KiB).fill(9), 640 * KiB);
  assert.equal(disk.allocatedPages, 4 + 32);
  const view = disk.view(MiB, 0);
  assert.ok(view);
  for (let i = 0; i < 4; i++) assert.equal(view[i * 256 * KiB], i + 1);
  assert.equal(view[640 * KiB], 9);
  assert.equal(view[4 * KiB], 0);
  // Later writes show through a view already lent; reads never overlap what they should not.
  disk.write(new Uint8Array(1).fill(7), 5);
  assert.equal(view[5], 7);
  assert.equal(disk.view(64 * KiB - 1, 0), undefined, "small reads are copied");
  assert.equal(disk.view(MiB, MiB / 2), undefined, "reads across two slabs are copied");
});

test("SparseArray: pages left all zero are freed; extents are merged and skip what was never written", () => {
  const disk = new SparseArray();
  const extents = (count: number, offset: number) => {
    const out: [number, number, number][] = [];
    disk.extents(count, offset, (start, length, type) => out.push([start, length, type]));
    return out;
  };
  // nbdkit's example: 512 bytes written then trimmed, a page each side of 5 MiB.
  disk.write(new Uint8Array(512).fill(1), 0);
  disk.write(new Uint8Array(512).fill(2), 5 * MiB);
  assert.deepEqual(extents(10 * MiB, 0), [[0, 4 * KiB, 0], [4 * KiB, 5 * MiB - 4 * KiB, 3], [
    5 * MiB,
    4 * KiB,
    0,
  ], [5 * MiB + 4 * KiB, 5 * MiB - 4 * KiB, 3]]);
  disk.zero(512, 0);
  disk.zero(512, 5 * MiB);
  assert.equal(disk.allocatedPages, 0);
  assert.deepEqual(extents(10 * MiB, 0), [[0, 10 * MiB, 3]]);
  // The same in a slab: a page zeroed in part stays while it holds data.
  disk.write(new Uint8Array(MiB).fill(3), 0);
  disk.zero(100, 4 * KiB);
  assert.equal(disk.allocatedPages, 256);
  disk.zero(MiB - 8 * KiB, 8 * KiB);
  assert.equal(disk.allocatedPages, 2);
  assert.deepEqual(extents(2 * MiB, 0), [[0, 8 * KiB, 0], [8 * KiB, 2 * MiB - 8 * KiB, 3]]);
  // A huge disk with data only at its end: the walk passes over the rest whole.
  const far = 16 * 1024 * 1024 * MiB - 4 * KiB; // 16 TiB
  disk.write(new Uint8Array(1).fill(4), far);
  const all = extents(far + 4 * KiB, 0);
  assert.deepEqual(all.slice(-2), [[8 * KiB, far - 8 * KiB, 3], [far, 4 * KiB, 0]]);
});
