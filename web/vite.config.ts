import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

const here = fileURLToPath(new URL('.', import.meta.url));
const proto = fileURLToPath(new URL('../proto', import.meta.url));

// The app imports the gateway's generated wire types from ../proto (type-only, erased at build
// time); the dev server is allowed to read that folder too.
export default defineConfig({
  plugins: [react()],
  server: {
    port: 5173,
    fs: { allow: [here, proto] },
  },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    sourcemap: true,
  },
});
