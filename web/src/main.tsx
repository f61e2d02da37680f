import { QueryClient, QueryClientProvider } from '@tanstack/react-query';
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { App } from './App';
import { captureTokenFromUrl } from './lib/token';
import './styles.css';

captureTokenFromUrl();

const queryClient = new QueryClient({
  defaultOptions: {
    queries: {
      // The socket keeps the cache current and every (re)connect refetches; no polling.
      staleTime: Infinity,
      refetchOnWindowFocus: false,
      refetchOnReconnect: false,
      retry: (failures, error) => failures < 3 && !(error instanceof Error && 'status' in error && (error as { status: number }).status < 500),
    },
  },
});

createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <QueryClientProvider client={queryClient}>
      <App />
    </QueryClientProvider>
  </StrictMode>,
);
