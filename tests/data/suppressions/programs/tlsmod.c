__thread int big[1000];
int *get(void){ big[3] = 7; return &big[3]; }
