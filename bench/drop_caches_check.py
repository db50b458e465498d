import os, sys, time, subprocess, tempfile, hashlib, json
from pathlib import Path
from fusecache.bench.standin import running_standin
def sha(p):
    with open(p,'rb') as f: return hashlib.file_digest(f,'sha256').hexdigest()
def drop(): Path('/proc/sys/vm/drop_caches').write_text('3\n')
tmp=Path(tempfile.mkdtemp()); cache=tmp/'cache'
with running_standin() as s:
    (s.bucket_dir/'m.safetensors').write_bytes(os.urandom(400<<20)); size=400<<20
    want=sha(s.bucket_dir/'m.safetensors')
    time.sleep(1.5)
    def mount():
        mnt=Path(tempfile.mkdtemp())
        subprocess.run([sys.executable,'-m','fusecache','mount',str(s.mount),str(mnt),'--cache-dir',str(cache)],check=True,capture_output=True)
        return mnt
    def umount(mnt): subprocess.run([sys.executable,'-m','fusecache','umount',str(mnt)],check=True)
    mnt=mount()
    try:
        b0=s.bytes_sent(); t=time.perf_counter(); assert sha(mnt/'m.safetensors')==want; t1=time.perf_counter()-t
        b1=s.bytes_sent(); print(f'first read: {(b1-b0)/size:.4f}x file bytes from lower, {size/t1/1e6:.0f} MB/s')
        dl=time.time()+30
        while json.loads(os.getxattr(mnt,'user.fusecache.stats'))['disk_used'] < size and time.time()<dl: time.sleep(0.1)
        drop(); t=time.perf_counter(); assert sha(mnt/'m.safetensors')==want; t2=time.perf_counter()-t
        b2=s.bytes_sent(); print(f'after drop_caches: {(b2-b1)/size:.4f}x from lower, {size/t2/1e6:.0f} MB/s', json.loads(os.getxattr(mnt,'user.fusecache.stats')))
    finally: umount(mnt)
    mnt=mount()
    try:
        drop(); t=time.perf_counter(); assert sha(mnt/'m.safetensors')==want; t3=time.perf_counter()-t
        b3=s.bytes_sent(); print(f'after remount + drop_caches: {(b3-b2)/size:.4f}x from lower, {size/t3/1e6:.0f} MB/s')
    finally: umount(mnt)
